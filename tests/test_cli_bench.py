"""`forge bench --endpoint`: the CLI over the load generator, against the local streaming stub."""

from __future__ import annotations

import json

from click.testing import CliRunner

from forge.cli import main
from tests.stream_stub import StubBehavior, running_stub
from tests.tiny import make_tokenizer


def test_bench_reports_levels_and_fails_an_unmeetable_gate(tmp_path):
    tok = tmp_path / "tok"
    make_tokenizer(512).save_pretrained(tok)
    with running_stub(StubBehavior(ttft_s=0.005, itl_s=0.001, tokens_per_chunk=2)) as stub:
        args = [
            "bench",
            "--endpoint",
            stub.url,
            "--model",
            "m",
            "--tokenizer",
            str(tok),
            "--concurrency",
            "1,4",
            "--prompt-tokens",
            "16",
            "--output-tokens",
            "8",
            "--requests",
            "6",
            "--out",
            str(tmp_path / "out"),
        ]
        ok = CliRunner().invoke(main, [*args, "--json", "--gpu-usd-per-hour", "4.5"])
        strict = CliRunner().invoke(main, [*args, "--max-ttft-p99-ms", "0.001"])
        old_spelling = CliRunner().invoke(main, [*args, "--ttft-p99-ms", "0.001"])
    assert ok.exit_code == 0, ok.output
    summary = json.loads(ok.output)
    assert [lv["label"] for lv in summary["levels"]] == ["c1", "c4"]
    assert all(lv["total_output_tokens"] == 6 * 8 for lv in summary["levels"])
    assert summary["cost"]["usd_per_gpu_hour"] == 4.5
    assert (tmp_path / "out" / "summary.json").is_file()
    assert strict.exit_code == 1, strict.output
    assert "throughput gates failed: max_ttft_p99_ms at c4 measured" in strict.output
    assert "limit: maximum 0.001" in strict.output
    # The option is the recipe's gate name; the old spelling still works, says it is deprecated, and is not offered.
    assert old_spelling.exit_code == 1 and "max_ttft_p99_ms at c4" in old_spelling.output
    assert "--ttft-p99-ms is deprecated; use --max-ttft-p99-ms" in old_spelling.output
    help_text = CliRunner().invoke(main, ["bench", "--help"]).output
    gates = ("max-ttft-p99-ms", "max-tpot-p99-ms", "min-output-tps", "min-goodput")
    assert all(f"--{name}" in help_text for name in gates)
    assert "--ttft-p99-ms" not in help_text and "--min-output-tok-s" not in help_text


def test_bench_asks_the_flavor_only_after_the_arguments_pass(tmp_path):
    """Without --flavor, the server is asked which length fields it takes, but never before the
    arguments are checked (exit 2, nothing sent), and a server that is not there is exit 3."""
    tok = tmp_path / "tok"
    make_tokenizer(512).save_pretrained(tok)
    args = ["bench", "--endpoint", "http://127.0.0.1:9", "--model", "m", "--tokenizer", str(tok)]
    bad = CliRunner().invoke(main, [*args, "--prompt-tokens", "100000", "--requests", "10000"])
    assert bad.exit_code == 2, bad.output
    down = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "out")])
    assert down.exit_code == 3 and "could not be reached to detect --flavor" in down.output, down.output
    with running_stub(StubBehavior()) as stub:
        found = CliRunner().invoke(main, ["bench", "--endpoint", stub.url, "--model", "m", "--tokenizer", str(tok),
                                          "--concurrency", "1", "--requests", "2", "--prompt-tokens", "16",
                                          "--output-tokens", "4", "--out", str(tmp_path / "out")])  # fmt: skip
        sent = [r.body for r in stub.requests]
    assert found.exit_code == 0 and "--flavor vllm: the first the server accepts" in found.output, found.output
    assert sent[0]["max_tokens"] == 1 and sent[0]["ignore_eos"] is True and "stream" not in sent[0]  # the probe
    assert all(body["ignore_eos"] and body["min_tokens"] == 4 for body in sent[1:])
