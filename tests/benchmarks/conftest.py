from tests.ioe_train.conftest import one_thread  # noqa: F401  (tiny tensors: one intra-op thread)
