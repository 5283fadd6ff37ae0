"""train.cuda_graph: a micro-batch's loss and backward replayed from a CUDA graph give the eager
gradients, and the trainer reaches the eager run's weights with it. CUDA only, apart from the
clear errors where it cannot work."""

import json

import pytest
import torch

from conftest import tiny_model
from lolcats.attention.convert import convert_model
from lolcats.attention.modes import set_attention_mode
from lolcats.config import Config
from lolcats.pipeline import prepare, run_distill, run_finetune, stage_dirs
from lolcats.training.cuda_graph import GraphedLoss, check_graph_support, graphs_wanted
from lolcats.training.stages import distill_loss
from test_pipeline import env, make_cfg  # noqa: F401  (env: the tiny model and data fixture)

CUDA = torch.cuda.is_available()


def test_cuda_graph_needs_cuda_and_one_process():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        check_graph_support(torch.device("cpu"), 1)
    with pytest.raises(ValueError, match="needs one process"):
        check_graph_support(torch.device("cuda"), 2)


def test_cuda_graph_auto_is_on_for_one_cuda_process_only():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert graphs_wanted("auto", cuda, 1) and not graphs_wanted("auto", cuda, 2)
    assert not graphs_wanted("auto", cpu, 1) and not graphs_wanted(False, cuda, 1)
    assert graphs_wanted(True, cuda, 1)
    with pytest.raises(ValueError, match="needs one process"):
        graphs_wanted(True, cuda, 4)


def test_cuda_graph_on_cpu_run_is_a_clear_error(env, tmp_path):
    _, model_dir, data = env
    cfg = make_cfg(tmp_path, model_dir, data, **{"distill.cuda_graph": True})
    with pytest.raises(ValueError, match="cuda_graph: true needs a CUDA device"):
        run_distill(prepare(cfg))


def _distill_model(backend: str):
    cfg = Config()
    cfg.attention.backend, cfg.attention.window_size, cfg.attention.feature_dim = backend, 16, 16
    model = tiny_model(layers=3).to("cuda", torch.bfloat16)
    convert_model(model, cfg.attention)
    for n, p in model.named_parameters():
        p.requires_grad_(".feature_map_" in n or "window_factors" in n)
    set_attention_mode(model, "distill")
    return model, cfg


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gpu_graphed_loss_gives_the_eager_gradients(backend):
    model, cfg = _distill_model(backend)
    dev = torch.device("cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    batches = [torch.randint(0, 128, (2, 100), device=dev, generator=None) for _ in range(3)]

    def grads_eager():
        for p in params:
            p.grad = None
        losses = []
        for b in batches:
            loss, logs = distill_loss(model, b, cfg, dev)
            (loss * 0.5).backward()
            losses.append((float(loss), {k: float(v) for k, v in logs.items()}))
        return [p.grad.clone() for p in params], losses

    want, want_losses = grads_eager()
    for p in params:
        p.grad.zero_()
    graphed = GraphedLoss(lambda x: distill_loss(model, x, cfg, dev), params)
    got_losses = []
    for b in batches:  # the first call captures, every call replays on new data
        loss, logs = graphed(b, 0.5)
        got_losses.append((float(loss), {k: float(v) for k, v in logs.items()}))
    for (lw, logw), (lg, logg) in zip(want_losses, got_losses):
        assert lg == pytest.approx(lw, rel=1e-4)
        assert logg == pytest.approx(logw, rel=1e-4)
    for p, g in zip(params, want):
        torch.testing.assert_close(p.grad, g, rtol=1e-3, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("extra", [{}, {"distill.xent_factor": 1.0}, {"distill.block_size": 1}],
                         ids=["default", "xent", "blockwise"])
def test_gpu_trainer_with_cuda_graph_matches_eager(env, tmp_path, extra):
    """auto (the default) graphs one CUDA process; its runs reach the eager run's losses."""
    _, model_dir, data = env

    def run(sub, graph):
        cfg = make_cfg(tmp_path / sub, model_dir, data, **{"run.device": "cuda", "distill.cuda_graph": graph,
                                                            "finetune.cuda_graph": graph, **extra})
        ctx = prepare(cfg)
        run_distill(ctx)
        run_finetune(ctx)
        return [json.loads((d / "summary.json").read_text()) for d in stage_dirs(cfg)]

    eager, graphed = run("eager", False), run("graph", "auto")
    for e, g in zip(eager, graphed):
        assert g["steps"] == e["steps"] and g["tokens"] == e["tokens"]
        assert g["best_val"] == pytest.approx(e["best_val"], rel=2e-2)
        for he, hg in zip(e["history"], g["history"]):
            assert hg["val_loss"] == pytest.approx(he["val_loss"], rel=2e-2)


def test_capture_drops_the_causal_mask_transformers_builds(monkeypatch):
    """While a CUDA graph is captured transformers materialises the causal mask (no padding in it);
    the module drops it rather than read it (a host sync breaks the capture), in every mode."""
    import lolcats.attention.module as module

    model = convert_model(tiny_model(), Config().attention)
    causal = torch.ones(24, 24, dtype=torch.bool).tril()[None, None].expand(2, 1, 24, 24)
    attn = model.model.layers[0].self_attn
    seen = []
    monkeypatch.setattr(module, "key_mask_from_attention_mask", lambda m, T: seen.append(m) or None)
    for mode in ("student", "distill", "teacher"):
        set_attention_mode(model, mode)
        h = torch.randn(2, 24, model.config.hidden_size)
        pe = model.model.rotary_emb(h, torch.arange(24)[None].expand(2, 24))
        with torch.no_grad():
            want = attn(h, pe, attention_mask=None)[0]
            monkeypatch.setattr(module, "capturing", lambda device: True)
            got = attn(h, pe, attention_mask=causal)[0]
            monkeypatch.setattr(module, "capturing", lambda device: False)
        torch.testing.assert_close(got, want)
    assert all(m is None for m in seen)
