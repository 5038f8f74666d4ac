"""scripts/bench_load.py, its pure parts only: the loopback check, the summary (shares, percentiles) and the
/proc memory reading. The load test itself is a benchmark, run by hand (docs/serving.md), never here."""

import pytest


@pytest.fixture(scope="module")
def bl(load_script):
    return load_script("bench_load")


@pytest.mark.parametrize("host,ok", [
    ("127.0.0.1", True), ("127.5.6.7", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("LOCALHOST", True), ("0.0.0.0", False), ("10.0.0.1", False), ("192.168.1.2", False), ("example.com", False),
    ("localhost.example.com", False), ("127.0.0.1.nip.io", False), ("", False),
])
def test_is_loopback_host(bl, host, ok):
    assert bl.is_loopback_host(host) is ok


def test_loopback_url_refuses_other_hosts_and_schemes(bl):
    assert bl.loopback_url("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"
    assert bl.loopback_url("http://[::1]:9000") == "http://[::1]:9000"
    with pytest.raises(ValueError, match="not a loopback host"):
        bl.loopback_url("http://10.1.2.3:8000")
    with pytest.raises(ValueError, match="not a loopback host"):
        bl.loopback_url("http://user@example.com:8000")
    with pytest.raises(ValueError, match="must look like"):
        bl.loopback_url("https://127.0.0.1:8000")
    with pytest.raises(ValueError, match="must look like"):
        bl.loopback_url("127.0.0.1:8000")


def test_summarize_shares_percentiles_and_retry_after(bl):
    O = bl.Outcome
    outcomes = ([O(200, float(s)) for s in range(1, 11)]  # 10 answers, 1..10 s
                + [O(503, 0.01, "3"), O(503, 0.02, "7"), O(504, 2.5), O(None, 0.0), O(500, 0.1), O(-1, 1.0)])
    s = bl.summarize(outcomes, wall_s=20.0, pairs_per_request=8)
    assert s["requests"] == 16 and s["pairs_ok"] == 80 and s["pairs_per_s"] == 4.0
    assert s["status_counts"] == {"200": 10, "503": 2, "504": 1, "other": 2, "no_answer": 1}
    assert s["status_share"]["503"] == 2 / 16 and sum(s["status_share"].values()) == pytest.approx(1.0)
    assert s["latency_ok_s"] == {"p50": 5.0, "p99": 10.0, "max": 10.0, "n": 10}  # nearest rank
    assert s["latency_all_s"]["n"] == 15  # every answer, not the request that got none
    assert s["retry_after_s"] == {"min": 3, "max": 7}
    assert s["other_statuses"] == [-1, 500]
    empty = bl.summarize([], wall_s=0.0, pairs_per_request=8)
    assert empty["pairs_per_s"] is None and empty["latency_ok_s"]["p50"] is None and empty["retry_after_s"] is None


def test_memory_kib_reads_proc_status(bl):
    text = "Name:\tpython\nVmPeak:\t 9000 kB\nVmHWM:\t  1400000 kB\nVmRSS:\t  1300000 kB\nThreads:\t5\n"
    assert bl.memory_kib(text) == {"VmHWM": 1400000, "VmRSS": 1300000}
    with open("/proc/self/status") as f:  # the real file has both
        assert set(bl.memory_kib(f.read())) == {"VmHWM", "VmRSS"}
