"""``python -m paralab simulate``: numbers, JSON, plots and errors that teach."""

import json
import subprocess
import sys
from fractions import Fraction

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

from paralab import cli  # noqa: E402
from paralab.schedules import build  # noqa: E402
from paralab.simulator import simulate  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv):
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)  # exactly one JSON document, nothing else on stdout


def test_json_homework_numbers(capsys):
    got = run_json(capsys, "simulate", "--schedule", "1f1b", "-p", "4", "-m", "8",
                   "--tf", "2", "--tb", "4")
    assert got["schedule"] == "1f1b"
    assert (got["stages"], got["microbatches"], got["chunks"]) == (4, 8, 1)
    assert (got["makespan"], got["ideal"]) == ((8 + 4 - 1) * (2 + 4), 8 * (2 + 4))
    assert got["time_ratio"] == 1.375
    assert got["bubble_overhead"] == 0.375
    assert got["bubble_fraction"] == pytest.approx(3 / 11)
    assert got["exact"]["bubble_fraction"] == "3/11"
    assert got["peak_activations"] == [4, 3, 2, 1]
    assert got["order"] == build("1f1b", 4, 8).to_strings()
    assert got["order"][3][:4] == ["3F0", "3B0", "3F1", "3B1"]


def test_json_gpipe_m16_and_interleaved(capsys):
    got = run_json(capsys, "simulate", "--schedule", "gpipe", "-p", "4", "-m", "16",
                   "--tf", "2", "--tb", "4")
    assert (got["makespan"], got["ideal"], got["time_ratio"]) == (114, 96, 19 / 16)
    assert got["peak_activations"] == [16] * 4
    got = run_json(capsys, "simulate", "--schedule", "interleaved", "-p", "4", "-m", "8",
                   "-v", "2", "--tf", "2", "--tb", "4")
    assert (got["makespan"], got["chunks"]) == (57, 2)
    got = run_json(capsys, "simulate", "--schedule", "interleaved", "-p", "4", "-m", "8",
                   "-v", "4", "--tf", "2", "--tb", "4")
    assert got["makespan"] == 52.5 and got["exact"]["makespan"] == "105/2"


def test_zb_h1_and_w_costs(capsys):
    zb = run_json(capsys, "simulate", "--schedule", "zb-h1", "-p", "4", "-m", "8",
                  "--tf", "2", "--tb", "2", "--tw", "2")
    one = run_json(capsys, "simulate", "--schedule", "1f1b", "-p", "4", "-m", "8",
                   "--tf", "2", "--tb", "2", "--tw", "2")
    assert one["idle"] == [3 * 6] * 4 and zb["idle"] == [6] * 4
    assert any("W" in a for a in zb["order"][0])


def test_numbers_are_read_exactly(capsys):
    got = run_json(capsys, "simulate", "--schedule", "gpipe", "-p", "3", "-m", "5",
                   "--tf", "1/3", "--tb", "0.5", "--comm", "1/10")
    expected = simulate(build("gpipe", 3, 5), Fraction(1, 3), Fraction(1, 2),
                        comm=Fraction(1, 10))
    assert got["exact"]["makespan"] == str(expected.makespan)
    assert got["costs"] == {"t_f": "1/3", "t_b": "1/2", "t_w": "0", "comm": "1/10"}


def test_text_summary_names_the_three_ratios(capsys):
    code, out, err = run(capsys, "simulate", "--schedule", "1f1b", "-p", "4", "-m", "8",
                         "--tf", "2", "--tb", "4", "--gantt")
    assert code == 0 and err == ""
    assert "rank 0: 0F0 0F1 0F2 0F3 0B0" in out
    lines = {line.split(":")[0]: line for line in out.splitlines() if ":" in line}
    assert lines["makespan T"].split()[-1] == "66"
    assert "11/8" in lines["time ratio T / T_ideal"]
    assert "3/8" in lines["bubble overhead bubble / T_ideal"]
    assert "3/11" in lines["bubble fraction bubble / T"]
    assert lines["peak activations per rank"].split()[-4:] == ["4", "3", "2", "1"]
    assert "rank 3 |" in out  # the text Gantt


@pytest.mark.parametrize("argv, fragment", [
    (["--schedule", "interleaved", "-p", "4", "-m", "3", "--tf", "1", "--tb", "1"],
     "needs at least p=4 microbatches"),
    (["--schedule", "gpipe", "-p", "0", "-m", "6", "--tf", "1", "--tb", "1"], "-p"),
    (["--schedule", "gpipe", "-p", "2", "-m", "6", "--tf", "-1", "--tb", "1"], "negative"),
    (["--schedule", "gpipe", "-p", "2", "-m", "6", "--tf", "1", "--tb", "1", "--tw", "-1/2"],
     "negative"),
    (["--schedule", "1f1b", "-p", "2", "-m", "6", "-v", "2", "--tf", "1", "--tb", "1"],
     "interleaved"),
    (["--schedule", "gpipe", "-p", "2", "-m", "6", "--tf", "two", "--tb", "1"],
     "not a number"),
    (["--schedule", "gpipe", "-p", "2", "-m", "six", "--tf", "1", "--tb", "1"], "-m"),
    (["--schedule", "pipedream", "-p", "2", "-m", "6", "--tf", "1", "--tb", "1"], "choose from"),
    (["--schedule", "gpipe", "-p", "2"], "required"),
])
def test_bad_arguments_give_one_error_line(capsys, argv, fragment):
    code, out, err = run(capsys, "simulate", *argv)
    assert code != 0 and out == ""
    assert err.startswith("error:") and err.count("\n") == 1, err
    assert fragment in err
    assert "Traceback" not in err


def test_plot_writes_a_png(capsys, tmp_path):
    path = tmp_path / "gantt.png"
    code, out, err = run(capsys, "simulate", "--schedule", "zb-h1", "-p", "3", "-m", "4",
                         "--tf", "1", "--tb", "1", "--tw", "1/2", "--plot", str(path))
    assert code == 0 and str(path) in out
    assert path.read_bytes()[:8] == PNG
    got = run_json(capsys, "simulate", "--schedule", "1f1b", "-p", "2", "-m", "2",
                   "--tf", "1", "--tb", "1", "--plot", str(tmp_path / "b.png"))
    assert got["makespan"] == 6 and (tmp_path / "b.png").exists()
    code, out, err = run(capsys, "simulate", "--schedule", "1f1b", "-p", "2", "-m", "2",
                         "--tf", "1", "--tb", "1", "--plot", str(tmp_path / "no" / "x.png"))
    assert code != 0 and err.startswith("error:") and err.count("\n") == 1


def test_commands_can_be_registered(capsys, monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", dict(cli.COMMANDS))
    seen = {}

    def setup(parser):
        parser.add_argument("--n", type=int, default=1)

    def run_it(args):
        seen["n"] = args.n
        return 0

    cli.add_subcommand("demo", setup, run_it, help="a demo command")
    assert cli.main(["demo", "--n", "3"]) == 0 and seen == {"n": 3}
    with pytest.raises(ValueError, match="already registered"):
        cli.add_subcommand("demo", setup, run_it)
    # "module:function" hooks are imported when the command runs
    cli.add_subcommand("demo2", "paralab.cli:setup_simulate", "paralab.cli:run_simulate")
    got = run_json(capsys, "demo2", "--schedule", "gpipe", "-p", "2", "-m", "1",
                   "--tf", "1", "--tb", "1")
    assert got["makespan"] == 4


def test_python_dash_m_paralab(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "paralab", "simulate", "--schedule", "interleaved", "-p", "4",
         "-m", "8", "-v", "4", "--tf", "2", "--tb", "4", "--json"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    assert got["makespan"] == 52.5
    assert got["peak_activations"] == [19, 17, 15, 13]
    bad = subprocess.run([sys.executable, "-m", "paralab", "simulate", "--schedule", "gpipe",
                          "-p", "2", "-m", "2", "--tf", "x", "--tb", "1"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error:") and bad.stderr.count("\n") == 1


def test_large_orders_only_on_request(capsys):
    # 8 ranks x 128 microbatches x (F + B) = 2048 actions: past the 2000 printed by default.
    argv = ["simulate", "--schedule", "gpipe", "-p", "8", "-m", "128", "--tf", "1", "--tb", "2"]
    got = run_json(capsys, *argv)
    assert got["order"] is None and got["actions"] == 2048
    assert "pass --order" in got["order_note"]
    assert got["makespan"] == (128 + 7) * 3 and got["peak_activations"] == [128] * 8
    full = run_json(capsys, *argv, "--order")
    assert full["order"] == build("gpipe", 8, 128).to_strings()
    assert {k: v for k, v in full.items() if k != "order"} == \
        {k: v for k, v in got.items() if k not in ("order", "order_note")}
    code, out, _ = run(capsys, *argv)
    assert code == 0 and "2048 actions, not printed (use --order to print them)" in out
    code, out, _ = run(capsys, *argv, "--order")
    assert code == 0 and "rank 7: 7F0 7F1" in out and "7B127" in out
