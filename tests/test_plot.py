import json

import pytest


def test_plot_draws_several_runs_into_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    import plot

    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        (tmp_path / run / "metrics.jsonl").write_text("\n".join(json.dumps(
            {"step": s, "loss": 5 - s / 10, "lr": 1e-3, "tokens_per_sec": 900, **({"val_loss": 5} if s % 5 == 0
                                                                                    else {})}) for s in range(1, 11)))
    plot.main([str(tmp_path / "a"), str(tmp_path / "b" / "metrics.jsonl"), "--out", str(tmp_path / "runs.png")])
    assert (tmp_path / "runs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
