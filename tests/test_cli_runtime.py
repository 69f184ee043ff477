"""`python -m paralab run-pipeline` and `tp-ffn`: real processes behind the command line."""

import json

import pytest

from paralab.cli import main


def run_json(capsys, *argv):
    assert main(list(argv) + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_run_pipeline_reports_parity_and_memory(capsys):
    report = run_json(capsys, "run-pipeline", "--schedule", "1f1b", "-p", "4", "-m", "8")
    assert report["max_grad_error"] < 1e-12
    assert report["peak_activations"] == [4, 3, 2, 1]
    assert report["simulated_makespan_s"] is None  # no synthetic costs: nothing nominal
    assert report["calibrated_makespan_s"] > 0


@pytest.mark.slow
def test_run_pipeline_synthetic_interleaved(capsys):
    report = run_json(capsys, "run-pipeline", "--schedule", "interleaved", "-p", "4", "-m", "8",
                      "-v", "2", "--synthetic", "20,40")
    # (8 + 3/2) * (20 + 40) ms: the interleaved bubble is (p-1)(t_f+t_b)/v.
    assert report["simulated_makespan_s"] == pytest.approx((8 + 1.5) * 0.06)
    assert report["measured_makespan_s"] == pytest.approx(report["simulated_makespan_s"], rel=0.1)
    assert report["chunks"] == 2 and report["max_grad_error"] < 1e-12


def test_run_pipeline_text_output(capsys):
    assert main(["run-pipeline", "--schedule", "zb-h1", "-p", "2", "-m", "4"]) == 0
    out = capsys.readouterr().out
    assert "max |grad - single-process grad|: 0" in out
    assert "peak activations per rank (microbatch-stages in flight): [2, 1]" in out


@pytest.mark.parametrize("argv,message", [
    (["--schedule", "interleaved", "-p", "4", "-m", "3"], "needs at least p=4 microbatches"),
    (["--schedule", "1f1b", "-p", "0", "-m", "4"], "must be at least 1"),
    (["--schedule", "1f1b", "-p", "2", "-m", "4", "--synthetic", "1,x"], "TF_MS,TB_MS"),
    (["--schedule", "1f1b", "-p", "2", "-m", "4", "--synthetic", "5,-1"], "non-negative"),
])
def test_run_pipeline_bad_arguments_give_one_line(capsys, argv, message):
    assert main(["run-pipeline"] + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_tp_ffn_matches_the_formulas(capsys):
    report = run_json(capsys, "tp-ffn", "--world-size", "2", "--variant", "row-row",
                      "--batch", "2", "--seq", "4", "--hidden", "8")
    assert report["matches_formulas"] is True
    assert report["max_error"] < 1e-5
    assert [(c["phase"], c["op"], c["elements"]) for c in report["collectives"]] == [
        ("forward", "all_reduce", 2 * 4 * 32), ("forward", "all_reduce", 2 * 4 * 8),
        ("backward", "all_gather", 2 * 4 * 32), ("backward", "all_gather", 2 * 4 * 8)]


def test_tp_ffn_rejects_uneven_sharding(capsys):
    assert main(["tp-ffn", "--world-size", "3", "--hidden", "8"]) == 2
    assert "not divisible by --world-size 3" in capsys.readouterr().err
