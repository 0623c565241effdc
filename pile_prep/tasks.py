"""How `--num-tasks` splits a job's inputs: whole files first, then chunks of the rest.

With F inputs and T tasks, the first floor(F/T)*T files are dealt out whole, round-robin (file
f to task f mod T). Each of the R = F mod T remaining files is shared by the tasks t with
t mod R = its rank among them, which take its chunks in turn (chunk c to the (c mod n)-th of
its n sharers). So more tasks than files still split the work (The Pile's 30 files no longer cap
a job at 30 tasks), a task decompresses at most one shared file, and every shard keeps the name
it has in a one-task run: the union of all tasks' shard files is byte-identical to one task's.
"""

from __future__ import annotations

from typing import NamedTuple


class Share(NamedTuple):
    """This task's part of one input: chunks c with c % stride == phase."""

    stride: int
    phase: int

    def takes(self, chunk_index: int) -> bool:
        return chunk_index % self.stride == self.phase


def task_shares(num_inputs: int, num_tasks: int, task_index: int) -> dict[int, Share]:
    """{input index: share} of task `task_index`, in input order."""
    whole = num_inputs // num_tasks * num_tasks
    shares = {f: Share(1, 0) for f in range(task_index, whole, num_tasks)}
    rest = num_inputs - whole
    if rest:
        j = task_index % rest  # the remaining file this task shares
        sharers = [t for t in range(num_tasks) if t % rest == j]
        shares[whole + j] = Share(len(sharers), sharers.index(task_index))
    return shares
