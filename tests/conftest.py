import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer end-to-end runs (CI still runs them)")


#: The test files that take longest (measured: ``pytest --durations``, 2026-12-01), run first.
#: pytest-xdist's ``--dist loadfile`` hands whole files to the two workers in collection
#: order; starting with the longest ones keeps a long file from being the last one a single
#: worker runs while the other is idle (longest-first scheduling). Order within a file and
#: among the other files is unchanged.
LONGEST_FIRST = (
    "engine/test_runner.py", "test_export.py", "test_multiworker_cli.py", "test_serving.py", "test_callbacks.py",
    "test_litert.py", "test_reliability.py", "models/test_rfcn.py", "models/test_mask_rcnn.py", "test_cli.py",
    "models/test_sliding_window.py", "test_distribute.py", "models/test_faster_rcnn.py", "models/test_decompnet.py",
    "benchmarks/test_paper_claims.py", "models/test_smn.py",
)


def pytest_collection_modifyitems(session, config, items):
    here = os.path.dirname(os.path.abspath(__file__))
    rank = {os.path.join(here, path): i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(str(item.path), len(rank)))
