#!/usr/bin/env python3
"""Runs the relay integration tests (real daemons on loopback).

    RELAY_BIN=build/relay/relay python3 tests/integration/run_tests.py            # every module
    RELAY_BIN=build/relay/relay python3 tests/integration/run_tests.py durability # one module
    ... run_tests.py test_ingest.IngestTest.test_batch                            # one test

Arguments are module names (`cli`, `test_cli` or `test_cli.py`) or dotted test names.
Environment: RELAY_BIN (binary; default build/relay/relay), RELAY_KEEP=1 (keep every test
folder), RELAY_KEEP_FAILED=1 (keep the folders of failed tests), RELAY_SEED (random seed of
the crash tests), RELAY_TEST_TMP (parent folder of the test folders), RELAY_NO_SNAPSHOT=1 (run
$RELAY_BIN itself rather than a copy taken at the start; see relay_harness.relay_bin).
The last line printed is "N passed, M failed"; the exit status is 1 when anything failed.
"""
import os
import sys
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


class TimedResult(unittest.TextTestResult):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.durations = []
        self._started = {}

    def startTest(self, test):
        self._started[test.id()] = time.monotonic()
        super().startTest(test)

    def stopTest(self, test):
        t0 = self._started.pop(test.id(), None)
        if t0 is not None:
            self.durations.append((time.monotonic() - t0, test.id()))
        super().stopTest(test)


def test_name(arg):
    if arg.endswith(".py"):
        arg = arg[:-3]
    arg = os.path.basename(arg) if "/" in arg else arg
    head = arg.split(".", 1)
    if not head[0].startswith("test_"):
        head[0] = "test_" + head[0]
    return ".".join(head)


def main(argv):
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    if os.environ.get("RELAY_BIN"):
        os.environ["RELAY_BIN"] = os.path.abspath(os.environ["RELAY_BIN"])
    loader = unittest.TestLoader()
    if argv:
        suite = loader.loadTestsFromNames([test_name(a) for a in argv])
    else:
        suite = loader.discover(HERE, pattern="test_*.py", top_level_dir=HERE)
    import relay_harness
    try:
        binary = relay_harness.relay_bin()
    except RuntimeError as e:
        print(f"error: {e}", flush=True)
        print("0 passed, 1 failed", flush=True)
        return 1
    print(f"relay binary: {relay_harness.source_bin()} (running a snapshot: {binary})",
          flush=True)
    runner = unittest.TextTestRunner(stream=sys.stdout, verbosity=2, resultclass=TimedResult)
    t0 = time.monotonic()
    result = runner.run(suite)
    elapsed = time.monotonic() - t0
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    skipped = len(result.skipped)
    xfail = len(result.expectedFailures)
    passed = result.testsRun - failed - skipped - xfail
    print("\nslowest tests:")
    for d, name in sorted(result.durations, reverse=True)[:10]:
        print(f"  {d:7.1f}s  {name}")
    notes = []
    if skipped:
        notes.append(f"{skipped} skipped")
    if xfail:
        notes.append(f"{xfail} expected failure(s)")
    print(f"total {elapsed:.1f}s" + (" (" + ", ".join(notes) + ")" if notes else ""))
    sys.stdout.flush()
    sys.stderr.flush()
    print(f"{passed} passed, {failed} failed", flush=True)
    return 1 if failed or result.testsRun == 0 else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
