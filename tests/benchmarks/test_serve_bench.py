"""benchmarks/serve_bench.py without vLLM: W1's folder and tokenizer, the command lines,
and the report built from hand-written `vllm bench serve` result files."""

from __future__ import annotations

import json
import math
import sys

import pytest
from tokenizers import Tokenizer as HFTokenizer

from benchmarks import serve_bench
from benchmarks.serve_bench import ServeWorkload
from runner.formats.tokenizer import Tokenizer


def _result(output_throughput: float, ttft_p50: float, **extra: float) -> dict:
    """A `vllm bench serve --save-result` file's fields that the report reads."""
    return {"duration": 8.0, "completed": 4, "failed": 0, "total_output_tokens": 32, "request_throughput": 0.5,
            "output_throughput": output_throughput, "p50_ttft_ms": ttft_p50, "median_ttft_ms": ttft_p50,
            "p99_ttft_ms": 2 * ttft_p50, "p50_itl_ms": 10.0, "p99_itl_ms": 30.0, "p50_tpot_ms": 11.0,
            "errors": ["", ""], **extra}


def test_tokenizer_round_trips_every_id_at_w1_vocabulary_size():
    w = ServeWorkload().workload()
    tok = serve_bench.word_level_tokenizer(w.vocab_size)
    backend = tok.backend
    assert backend.get_vocab_size() == w.vocab_size == 32000
    ids = [0, 1, 5, 31999, 12345, 7]
    text = backend.decode(ids)
    assert backend.encode(text).ids == ids  # vLLM's random dataset re-encodes what it decodes


def test_folder_holds_w1_with_the_tokenizer(tmp_path):
    sw = ServeWorkload(input_len=16, output_len=8)
    folder = serve_bench.build_folder(sw, tmp_path / "w1")
    config = json.loads((folder / "config.json").read_text())
    assert config["vocab_size"] == 32000 and config["num_hidden_layers"] == 8
    assert config["max_position_embeddings"] >= sw.max_model_len
    loaded = Tokenizer.from_folder(folder)
    assert loaded.backend.get_vocab_size() == 32000
    assert HFTokenizer.from_file(str(folder / "tokenizer.json")).encode("t3 t4").ids == [3, 4]
    # transformers (vLLM's tokenizer loader) must not rebuild Qwen3's byte-level pipeline.
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_both_servers_get_the_same_engine_settings(tmp_path):
    sw = ServeWorkload(input_len=16, output_len=8, max_num_seqs=4, max_num_batched_tokens=64)
    ours = serve_bench.ours_command(sys.executable, tmp_path, 1234, sw)
    vllm = serve_bench.vllm_command("/vllm/python", tmp_path, 1235, sw)

    def flag(command: list[str], name: str) -> str:
        return command[command.index(name) + 1]

    for name in ("--host", "--dtype", "--max-model-len", "--max-num-seqs", "--max-num-batched-tokens",
                 "--served-model-name", "--seed"):
        assert flag(ours, name) == flag(vllm, name), name
    assert flag(ours, "--host") == "127.0.0.1" and flag(ours, "--dtype") == "float32"
    assert flag(ours, "--max-model-len") == "24"
    assert "--no-enable-prefix-caching" in ours and "--no-enable-prefix-caching" in vllm
    assert "--enable-control-endpoints" not in ours
    assert int(flag(ours, "--num-kv-blocks")) == 2 * 4 + 1  # every sequence fits whole
    client = serve_bench.client_command("/vllm/python", tmp_path, 1235, sw, math.inf, 4, tmp_path, "r.json")
    assert flag(client, "--request-rate") == "inf" and flag(client, "--random-input-len") == "16"
    assert "--ignore-eos" in client and flag(client, "--temperature") == "0"


def test_warmup_run_twins_the_measured_one_unless_told():
    assert ServeWorkload(num_prompts=12).warmup_count == 12
    assert ServeWorkload(num_prompts=12, warmup_prompts=3).warmup_count == 3


def test_summary_reads_vllm_result_keys_and_refuses_missing_ones():
    summary = serve_bench.summarize(_result(100.0, 50.0))
    assert summary["output_throughput"] == 100.0 and summary["ttft_p50_ms"] == 50.0
    assert summary["ttft_p99_ms"] == 100.0 and summary["itl_p99_ms"] == 30.0
    assert summary["completed"] == 4 and "first_error" not in summary
    # Without --metric-percentiles 50, vLLM names the median only.
    median_only = {k: v for k, v in _result(100.0, 50.0).items() if k != "p50_ttft_ms"}
    assert serve_bench.summarize(median_only)["ttft_p50_ms"] == 50.0
    broken = _result(100.0, 50.0)
    del broken["p99_itl_ms"]
    with pytest.raises(KeyError, match="p99_itl_ms"):
        serve_bench.summarize(broken)
    assert serve_bench.summarize(_result(1.0, 1.0, errors=["", "boom"]))["first_error"] == "boom"


def test_report_ratios_and_table():
    sw = ServeWorkload(request_rates=(2.0, math.inf))
    report = {"workload": {"request_rates": ["2", "inf"], "warmup_prompts": 2},
              "ours": {"rates": {"2": serve_bench.summarize(_result(16.0, 40.0)),
                                 "inf": serve_bench.summarize(_result(130.0, 100.0))},
                       "startup_s": 7.0, "warmup_runs_s": 20.0},
              "vllm": {"rates": {"2": serve_bench.summarize(_result(16.0, 80.0)),
                                 "inf": serve_bench.summarize(_result(100.0, 200.0))},
                       "startup_s": 60.0, "warmup_runs_s": 20.0},
              "offline": {"output_throughput": 200.0, "request_throughput": 3.0}}
    serve_bench.add_ratios(report)
    assert report["ratio_ours_vllm"]["inf"]["output_throughput"] == pytest.approx(1.3)
    assert report["ratio_ours_vllm"]["2"]["ttft_p50_ms"] == pytest.approx(0.5)
    # The saturating rate is the highest one run, whatever order the rates came in.
    assert report["server_over_offline"] == {"rate": "inf", "output_throughput": pytest.approx(0.65)}
    text = serve_bench.table(report)
    assert "ours/vLLM" in text and "1.30" in text and "0.65" in text
    assert [rate_line.split()[0] for rate_line in text.splitlines()[2:8]] == ["2"] * 3 + ["inf"] * 3
    assert [serve_bench.rate_name(r) for r in sw.request_rates] == ["2", "inf"]
