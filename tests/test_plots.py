"""The edge plot: the Pareto front of (file size, perplexity) and the PNG it is drawn in."""
from analysis.plots import edge_pareto, pareto_front


def test_pareto_front_keeps_only_points_nothing_beats():
    pts = [(258, 16.5, "F16"), (138, 16.6, "Q8_0"), (110, 16.9, "Q6_K"), (100, 17.8, "Q4_K_M"),
           (105, 18.0, "worse"), (88, 18.4, "Q4_0"), (90, 19.0, "dominated")]
    assert [p[2] for p in pareto_front(pts)] == ["Q4_0", "Q4_K_M", "Q6_K", "Q8_0", "F16"]


def test_edge_pareto_draws_one_panel_per_model(tmp_path):
    def res(scale):
        return {"exports": {q: {"file_bytes": mb * 2**20 * scale,
                                "parity": {"ppl_llama_cpp": ppl},
                                "bench": [{"threads": 1, "gen_tok_s": 100.0},
                                          {"threads": 2, "gen_tok_s": 150.0}]}
                            for q, mb, ppl in (("F16", 258, 16.5), ("Q4_K_M", 100, 17.8))}}
    path = edge_pareto({"full": res(1.0), "pruned": res(0.84)}, tmp_path / "edge.png")
    assert path is not None and path.stat().st_size > 5000
    assert edge_pareto({"none": {"exports": {}}}, tmp_path / "none.png") is None


def test_bench_edge_merge_tabulates_ptq_and_qat_outputs_together(tmp_path, capsys):
    """`bench_edge.py --merge`: the PTQ run's files and a QAT run's file in one table per model
    (the QAT one labelled), largest first, and one plot."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import bench_edge

    def out(d, exports):
        (tmp_path / d / "SmolLM2").mkdir(parents=True)
        (tmp_path / d / "SmolLM2" / "results.json").write_text(json.dumps({
            "git_sha": "abcdef0123", "metrics": {"params": 134.5e6}, "exports": {
                q: {"file_bytes": mb * 2**20, "qat_grid": qat,
                    "parity": {"ppl_llama_cpp": ppl, "kl_float": 0.1, "kl_mean": 0.004},
                    "bench": [{"threads": t, "gen_tok_s": 50.0 * t, "prompt_tok_s": 300.0,
                               "peak_rss_mb": 200.0 + t} for t in (1, 2)]}
                for q, mb, ppl, qat in exports}}))
        return str(tmp_path / d)

    merged = bench_edge.merge([out("ptq", [("F16", 258.3, 16.5, None),
                                           ("Q4_0", 87.5, 18.4, None)]),
                               out("qat", [("Q4_0", 87.5, 17.1, True)])],
                              tmp_path / "edge.png")
    assert list(merged["SmolLM2"]["exports"]) == ["F16", "Q4_0", "Q4_0 QAT"]
    table = capsys.readouterr().out
    assert "| Q4_0 QAT | 87.5 | 17.10 | 1.0e-01 | 50.0 | 100.0 | 300 | 202 | 4.0e-03 |" in table
    assert table.index("| F16 |") < table.index("| Q4_0 |") and "(commit abcdef0)" in table
    assert (tmp_path / "edge.png").stat().st_size > 5000
    import pytest
    with pytest.raises(SystemExit, match="has Q4_0 QAT in more than one"):   # no silent overwrite
        bench_edge.merge([str(tmp_path / "qat"), str(tmp_path / "qat")])
