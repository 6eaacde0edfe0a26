"""tools/openai_load.py at a tiny size: aiperf (a client nobody here wrote) against a
real `serve-openai` process, every request answered."""

from __future__ import annotations


def test_openai_load_smoke(run_study, stdlib_streaming_export):
    result, report = run_study("openai_load", "--export", stdlib_streaming_export)
    assert [level["concurrency"] for level in result["levels"]] == [1, 2]
    for level in result["levels"]:
        assert level["errors"] == []
        assert level["requests"] == max(4, 4 * level["concurrency"])
        assert level["tokens_s"] > 0 and 0 < level["ttft_p50_ms"] <= level["ttft_p99_ms"]
    assert result["output_tokens"] == 4 and "| 2 | 8 |" in report
