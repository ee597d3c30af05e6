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
