import json

import pytest

pytest.importorskip("matplotlib")
import plot  # noqa: E402  (after the skip: plot.py needs matplotlib)


def metrics_lines(steps):
    return [json.dumps({"step": s, "loss": 5 - s / 10, "lr": 1e-3, "tokens_per_sec": 900,
                        **({"val_loss": 5} if s % 5 == 0 else {})}) for s in steps]


def test_plot_draws_several_runs_into_a_png(tmp_path):
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        (tmp_path / run / "metrics.jsonl").write_text("\n".join(metrics_lines(range(1, 11))))
    plot.main([str(tmp_path / "a"), str(tmp_path / "b" / "metrics.jsonl"), "--out", str(tmp_path / "runs.png")])
    assert (tmp_path / "runs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("last", ['{"step": 11, "loss": 3.9', '{"step": 11, "lo\n', "\0\0\0\0\n"],
                         ids=["cut mid-line", "cut with its newline", "zeroed by a crash"])
def test_a_metrics_file_whose_last_line_a_kill_cut_short_plots_the_rest_with_a_one_line_note(tmp_path, capsys, last):
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(metrics_lines(range(1, 11))) + "\n" + last)
    plot.main([str(path)])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"note: {path}: skipped its last line, cut short")
    assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r["step"] for r in plot.read_metrics(str(path))[1]] == list(range(1, 11))  # all the whole lines


@pytest.mark.parametrize("damage", ['{"step": 4, "lo', "[1, 2]", '{"loss": 3}', "[" * 50_000 + "]" * 50_000])
def test_a_damaged_line_before_the_last_is_refused_in_one_line_naming_that_line(tmp_path, damage, capsys):
    lines = metrics_lines(range(1, 11))
    lines[5:6] = ["", damage]  # a blank line 6 still counts: line 7 is the damaged one, as an editor numbers it
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit) as exit:
        plot.main([str(tmp_path)])
    err = capsys.readouterr().err
    assert exit.value.code == 2  # as every script of the repo exits on bad input
    assert err.startswith(f"error: {tmp_path / 'metrics.jsonl'} line 7 is not a metrics record")
    assert err.count("\n") == 1
    assert not (tmp_path / "metrics.png").exists()


def test_an_out_file_plot_cannot_write_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text("\n".join(metrics_lines(range(1, 4))))
    for out, why in [(tmp_path / "runs.xyz", "Format 'xyz' is not supported"),
                     (tmp_path / "missing" / "runs.png", "No such file or directory")]:
        with pytest.raises(SystemExit) as exit:
            plot.main([str(tmp_path), "--out", str(out)])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and err.startswith(f"error: cannot write {out}: {why}") and err.count("\n") == 1


def test_each_run_keeps_one_colour_in_every_panel(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        (tmp_path / run / "metrics.jsonl").write_text("\n".join(metrics_lines(range(1, 11))))
    figures = []
    monkeypatch.setattr(plt, "subplots", lambda *a, real=plt.subplots, **k: figures.append(real(*a, **k)) or
                        figures[-1])
    plot.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "runs.png")])
    [(fig, axes)] = figures
    colours = {}  # run -> the colours of its curves, over all panels (train and val alike)
    for ax in axes:
        for line in ax.get_lines():
            colours.setdefault(line.get_label().split()[0], set()).add(line.get_color())
    assert set(colours) == {"a", "b"} and all(len(c) == 1 for c in colours.values())
    assert colours["a"] != colours["b"]
