"""finetune.loss: next-token cross-entropy, KL to the teacher's logits (the same weights with adapters
off and softmax attention), or a mix; checked against a hand computation with a separate base model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from lolcats.attention.convert import convert_model
from lolcats.attention.layers import lolcats_modules
from lolcats.attention.modes import set_attention_mode
from lolcats.config import AttentionConfig, ConfigError, FinetuneConfig, load_config
from lolcats.models.lora import add_lora, lora_parameters
from lolcats.training import kl as kl_module
from lolcats.training.stages import finetune_loss
from test_pipeline import env, make_cfg  # noqa: F401  (env: the tiny model and data fixture)

VOCAB = 64
CPU = torch.device("cpu")


def student_and_base(seed: int = 0):
    """(LoRA'd converted model in student mode with non-zero adapters, an untouched copy of the base)."""
    base = tiny_model(vocab_size=VOCAB, layers=2, seed=seed)
    model = copy.deepcopy(base)
    convert_model(model, AttentionConfig(window_size=4, feature_dim=8, feature_init="random", softmax_layers=[1]))
    peft = add_lora(model, FinetuneConfig(lora_r=4))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)  # adapters that change the output
    set_attention_mode(peft, "student")
    return peft, base


def by_hand(student_logits, base_logits, ids, tau):
    """KL and CE over the predicted positions 0..T-2, written out."""
    s, t = student_logits[:, :-1].float(), base_logits[:, :-1].float()
    pt = torch.softmax(t / tau, -1)
    kl = (pt * (torch.log(pt) - torch.log_softmax(s / tau, -1))).sum(-1).mean() * tau**2
    ce = F.cross_entropy(s.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    return kl, ce


@pytest.mark.parametrize("loss,tau", [("kl", 1.0), ("kl", 2.0), ("mix", 1.5)])
def test_kl_loss_equals_a_hand_computation(monkeypatch, loss, tau):
    monkeypatch.setattr(kl_module, "CHUNK_ELEMENTS", 3 * VOCAB)  # chunks of 3 positions
    model, base = student_and_base()
    ids = torch.randint(0, VOCAB, (2, 11))
    f = FinetuneConfig(loss=loss, kl_temperature=tau, kl_weight=0.3, precision="fp32")
    params = list(lora_parameters(model).values())
    got, logs = finetune_loss(model, ids, f, CPU)
    got_grads = torch.autograd.grad(got, params)
    with torch.no_grad():
        t = base(ids).logits  # the teacher is the base model itself
    kl, ce = by_hand(model(ids).logits, t, ids, tau)
    want = kl if loss == "kl" else 0.7 * ce + 0.3 * kl
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logs["kl"], kl.detach(), rtol=1e-5, atol=1e-6)
    for g, w in zip(got_grads, torch.autograd.grad(want, params)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)
    assert kl > 0 and all(m.mode == "student" for m in lolcats_modules(model))  # the model is given back as it was
    assert all(p.requires_grad for p in params) and not model._adapters_disabled


def test_ce_is_the_next_token_loss():
    model, _ = student_and_base()
    ids = torch.randint(0, VOCAB, (2, 9))
    got, logs = finetune_loss(model, ids, FinetuneConfig(precision="fp32"), CPU)
    with torch.no_grad():
        _, ce = by_hand(model(ids).logits, model(ids).logits, ids, 1.0)
    torch.testing.assert_close(got.detach(), ce)
    assert logs == {}


def test_loss_options_are_checked():
    assert load_config(None, {"finetune": {"loss": "mix", "kl_weight": 0.2}}).finetune.loss == "mix"
    for bad, msg in (({"loss": "mse"}, "one of 'ce', 'kl', 'mix'"), ({"kl_weight": 1.5}, r"\[0, 1\]"),
                     ({"kl_temperature": 0}, "> 0")):
        with pytest.raises(ConfigError, match=msg):
            load_config(None, {"finetune": bad})


@pytest.mark.parametrize("loss", ["kl", "mix"])
def test_pipeline_trains_with_each_loss(env, tmp_path, loss):  # noqa: F811
    from lolcats.pipeline import linearize, stage_dirs

    _, model_dir, data = env
    cfg = make_cfg(tmp_path, model_dir, data, **{"finetune.loss": loss, "distill.max_steps": 2,
                                                  "finetune.max_steps": 4})
    report = linearize(cfg)
    hist = json.loads((stage_dirs(cfg)[1] / "summary.json").read_text())["history"]
    assert all(h["kl"] >= 0 and h["val_loss"] > 0 for h in hist)  # validation: next-token loss, and the KL
    assert report["stage2"]["val_loss"] > 0


def test_training_on_the_kl_brings_the_student_to_the_teacher():
    model, _ = student_and_base(seed=1)
    ids = torch.randint(0, VOCAB, (2, 16))
    f = FinetuneConfig(loss="kl", precision="fp32")
    opt = torch.optim.Adam(lora_parameters(model).values(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss, _ = finetune_loss(model, ids, f, CPU)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_kl_with_cuda_graph_matches_eager(env, tmp_path):  # noqa: F811
    """The teacher pass (adapters off, softmax) and the student pass captured in one graph."""
    from lolcats.pipeline import prepare, run_distill, run_finetune, stage_dirs

    _, model_dir, data = env

    def run(sub, graph):
        cfg = make_cfg(tmp_path / sub, model_dir, data, **{"run.device": "cuda", "finetune.cuda_graph": graph,
                                                            "finetune.loss": "mix", "attention.softmax_count": 1})
        ctx = prepare(cfg)
        run_distill(ctx)
        run_finetune(ctx)
        return json.loads((stage_dirs(cfg)[1] / "summary.json").read_text())

    eager, graphed = run("eager", False), run("graph", True)
    assert graphed["steps"] == eager["steps"]
    for he, hg in zip(eager["history"], graphed["history"]):
        assert hg["val_loss"] == pytest.approx(he["val_loss"], rel=2e-2)
        assert hg["kl"] == pytest.approx(he["kl"], rel=5e-2, abs=1e-3)
