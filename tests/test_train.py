"""The training loop: it learns, it is reproducible, it resumes exactly, it records loads
and traces, and it refuses bad input before training."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from moebal.data import DataConfig, load_corpus
from moebal.metrics import max_violation_per_layer
from moebal.model import ModelConfig
from moebal.routing import BALANCERS, Balancer
from moebal.train import (
    PRESETS,
    NonFiniteLoss,
    RoutingTrace,
    TrainConfig,
    Trainer,
    WarmupCosine,
    apply_overrides,
    get_preset,
    load_result,
    load_trace,
    read_metrics,
    save_trace,
    train,
)
from moebal.train import trainer as trainer_module
from moebal.train.optim import param_groups

WORDS = ("to be or not that is the question whether tis nobler in mind suffer slings and "
         "arrows of outrageous fortune take arms against a sea troubles by opposing end them "
         "die sleep no more say we heart ache thousand natural shocks flesh heir").split()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is faster, and immune to a busy machine's other load."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-corpus")
    texts = root / "texts"
    texts.mkdir()
    rng = np.random.default_rng(0)
    # a little structure to learn: each word is usually followed by one of two others
    nxt = {w: (WORDS[(i + 1) % len(WORDS)], WORDS[(i * 7 + 3) % len(WORDS)])
           for i, w in enumerate(WORDS)}
    for d in range(6):
        w, lines = WORDS[d], []
        for _ in range(600):
            line = []
            for _ in range(12):
                line.append(w)
                w = nxt[w][int(rng.random() < 0.3)] if rng.random() < 0.9 else rng.choice(WORDS)
            lines.append(" ".join(line))
        (texts / f"doc{d}.txt").write_text("\n".join(lines) + "\n")
    return load_corpus(DataConfig(path=str(texts), vocab_size=512, cache_dir=str(root / "cache")),
                       progress=False)


def micro(**train_changes):
    model_cfg, train_cfg = get_preset("micro")
    return model_cfg, dataclasses.replace(train_cfg, **train_changes)


def train_losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["type"] == "train"]


class _Interrupt(Exception):
    pass


def interrupted_run(monkeypatch, at_step, *args, **kwargs):
    """Run train(...) but raise as if killed once ``at_step`` steps are done."""
    original = trainer_module.Trainer.train_step

    def step(self):
        if self.step == at_step:
            raise _Interrupt
        return original(self)

    with monkeypatch.context() as m:
        m.setattr(trainer_module.Trainer, "train_step", step)
        with pytest.raises(_Interrupt):
            train(*args, **kwargs)


@pytest.fixture
def stepping_balancer(monkeypatch):
    """A loss-free-like balancer with state, counting its observe() and step() calls."""

    class CountingBias(Balancer):
        name = "test_counting_bias"

        def __init__(self, config):
            super().__init__(config)
            E = config.num_experts
            self.register_buffer("bias_E", torch.zeros(E))
            self.register_buffer("pending_E", torch.zeros(E))
            self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
            self.register_buffer("observed", torch.zeros((), dtype=torch.int64))

        def selection_scores(self, scores_TE, ctx):
            return scores_TE + self.bias_E

        def observe(self, loads_E, ctx):
            self.pending_E += loads_E
            self.observed += 1

        def step(self, group=None):
            self.bias_E += 0.05 * torch.sign(self.pending_E.mean() - self.pending_E)
            self.pending_E.zero_()
            self.steps += 1

    monkeypatch.setitem(BALANCERS, CountingBias.name, CountingBias)
    return CountingBias.name


def test_a_few_micro_steps_lower_the_loss(corpus):
    model_cfg, train_cfg = micro(steps=25, eval_every=0)
    result = train(model_cfg, train_cfg, data=corpus, progress=False)
    assert result.steps == 25
    assert result.final_loss < math.log(corpus.vocab_size) - 1.0
    assert result.val_loss < math.log(corpus.vocab_size) - 1.0
    assert result.val_ppl == pytest.approx(math.exp(result.val_loss))
    assert 0 <= result.max_vio_global and 0 <= result.avg_max_vio <= result.sup_max_vio


def test_run_folder_records_every_step(corpus, tmp_path):
    model_cfg, train_cfg = micro(steps=6, eval_every=3)
    result = train(model_cfg, train_cfg, tmp_path / "run", data=corpus, progress=False)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    steps = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in evals] == [3, 6]
    tokens = train_cfg.batch_size * model_cfg.seq_len
    for r in steps:
        loads = np.array(r["loads"])
        assert loads.shape == (model_cfg.n_layers, model_cfg.num_experts)
        assert (loads.sum(axis=1) == tokens * model_cfg.top_k).all()  # dropless
        vio = max_violation_per_layer(loads)
        assert r["max_vio_batch"] == pytest.approx(vio.mean())
        assert r["max_vio_batch_layers"] == pytest.approx(vio.tolist())
        assert r["tokens_per_s"] > 0 and 0 <= r["router_time_share"] < 1 and r["lr"] > 0
        assert r["aux_loss"] == 0.0  # balancer "none" has no loss
    assert evals[-1]["val_ppl"] == pytest.approx(result.val_ppl)
    assert load_result(tmp_path / "run").val_ppl == pytest.approx(result.val_ppl)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["vocab_size"] == corpus.vocab_size
    # the result hands back what the log holds: nobody needs to read metrics.jsonl
    assert result.series["step"] == [1, 2, 3, 4, 5, 6]
    assert result.series["loss"] == [r["loss"] for r in steps]
    assert result.series["val_ppl"] == [r["val_ppl"] for r in evals]
    assert [s["step"] for s in result.load_snapshots] == [1, 3, 6]
    assert result.load_snapshots[-1]["loads_LE"] == steps[-1]["loads"]
    assert load_result(tmp_path / "run").series == result.series


def test_same_seed_same_run_other_seed_other_run(corpus):
    model_cfg, train_cfg = micro(steps=4, eval_every=0)
    a = Trainer(model_cfg, train_cfg, corpus)
    b = Trainer(model_cfg, train_cfg, corpus)
    c = Trainer(model_cfg, dataclasses.replace(train_cfg, seed=1), corpus)
    la = [a.train_step().loss for _ in range(4)]
    assert la == [b.train_step().loss for _ in range(4)]
    assert la != [c.train_step().loss for _ in range(4)]


def test_gradient_accumulation_matches_one_big_batch(corpus):
    model_cfg, train_cfg = micro(steps=3, eval_every=0, batch_size=8)
    big = Trainer(model_cfg, train_cfg, corpus)
    acc = Trainer(model_cfg, dataclasses.replace(train_cfg, batch_size=4, grad_accum=2), corpus)
    for _ in range(3):
        s_big, s_acc = big.train_step(), acc.train_step()
        assert s_acc.loss == pytest.approx(s_big.loss, abs=1e-5)
        assert np.array_equal(s_acc.loads_LE, s_big.loads_LE)
    for p, q in zip(big.model.parameters(), acc.model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)


def test_routers_step_once_per_optimizer_step(corpus, stepping_balancer):
    model_cfg, train_cfg = micro(steps=5, eval_every=0, grad_accum=3, batch_size=4)
    model_cfg = dataclasses.replace(model_cfg, balancer=stepping_balancer)
    t = Trainer(model_cfg, train_cfg, corpus)
    for _ in range(5):
        t.train_step()
    t.evaluate()  # evaluation observes nothing and steps nothing
    for router in t.model.routers():
        assert int(router.balancer.steps) == 5
        assert int(router.balancer.observed) == 15
        assert router.balancer.bias_E.abs().sum() > 0


@pytest.mark.parametrize("balancer", ["none", "stateful"])
def test_resume_equals_uninterrupted(corpus, tmp_path, monkeypatch, stepping_balancer, balancer):
    model_cfg, train_cfg = micro(steps=10, eval_every=4, checkpoint_every=3, trace=True,
                                 trace_shards=4)
    if balancer == "stateful":
        model_cfg = dataclasses.replace(model_cfg, balancer=stepping_balancer)
    full = train(model_cfg, train_cfg, tmp_path / "full", data=corpus, progress=False)
    interrupted_run(monkeypatch, 8, model_cfg, train_cfg, tmp_path / "cut", data=corpus,
                    progress=False)
    # the last checkpoint is at step 6; steps 7-8 are recomputed
    assert max(r["step"] for r in read_metrics(tmp_path / "cut" / "metrics.jsonl")) == 8
    resumed = train(model_cfg, train_cfg, tmp_path / "cut", data=corpus, progress=False,
                    resume=True)
    assert train_losses(tmp_path / "cut") == train_losses(tmp_path / "full")  # exactly
    full_records = read_metrics(tmp_path / "full" / "metrics.jsonl")
    cut_records = read_metrics(tmp_path / "cut" / "metrics.jsonl")
    strip = lambda rs: [{k: v for k, v in r.items() if "second" not in k and k not in  # noqa
                         ("tokens_per_s", "router_time_share", "elapsed")} for r in rs]
    assert strip(cut_records) == strip(full_records)
    assert resumed.val_loss == full.val_loss and resumed.avg_max_vio == full.avg_max_vio
    a, b = load_trace(tmp_path / "full" / "trace.npz"), load_trace(tmp_path / "cut" / "trace.npz")
    assert np.array_equal(a.counts, b.counts) and np.array_equal(a.step, np.arange(1, 11))
    # resuming a finished run does nothing and returns its result
    again = train(model_cfg, train_cfg, tmp_path / "cut", data=corpus, progress=False, resume=True)
    assert again.val_loss == resumed.val_loss and again.steps == 10


def test_trace_counts_per_shard_add_up_to_the_loads(corpus, tmp_path):
    model_cfg, train_cfg = micro(steps=3, eval_every=0, trace=True, trace_shards=4,
                                 batch_size=4, grad_accum=2)
    train(model_cfg, train_cfg, tmp_path / "run", data=corpus, progress=False, preset="micro")
    trace = load_trace(tmp_path / "run" / "trace.npz")
    L, E = model_cfg.n_layers, model_cfg.num_experts
    assert trace.counts.shape == (3, L, 4, E) and trace.counts.dtype == np.int32
    assert trace.sequences_per_shard == 2 and trace.tokens_per_shard == 2 * model_cfg.seq_len
    assert (trace.num_experts, trace.top_k, trace.preset, trace.balancer) == (E, 2, "micro", "none")
    assert list(trace.moe_layers) == list(range(L))
    assert (trace.counts.sum(axis=3) == trace.tokens_per_shard * model_cfg.top_k).all()
    loads = [r["loads"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
             if r["type"] == "train"]
    assert np.array_equal(trace.loads, np.array(loads))


def test_trace_file_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    trace = RoutingTrace(
        counts=rng.integers(0, 1000, size=(5, 3, 2, 8)), step=np.arange(1, 6), num_experts=8,
        top_k=2, tokens_per_shard=512, seq_len=128, sequences_per_shard=4,
        moe_layers=np.array([1, 2, 3]), balancer="bip", preset="tiny", capacity_factor=1.25,
    )
    back = load_trace(save_trace(tmp_path / "t.npz", trace))
    assert np.array_equal(back.counts, trace.counts) and back.counts.dtype == np.int32
    assert np.array_equal(back.step, trace.step) and np.array_equal(back.moe_layers, [1, 2, 3])
    assert (back.num_experts, back.top_k, back.tokens_per_shard, back.seq_len,
            back.sequences_per_shard, back.balancer, back.preset, back.capacity_factor) == (
        8, 2, 512, 128, 4, "bip", "tiny", 1.25)
    assert np.array_equal(back.truncate(3).step, [1, 2, 3])
    with np.load(tmp_path / "t.npz", allow_pickle=False) as z:  # plain arrays, no pickle
        assert set(z.files) >= {"counts", "step", "num_experts", "top_k", "tokens_per_shard"}


def test_warmup_cosine_schedule():
    f = WarmupCosine(steps=110, warmup=10, lr=1e-3, min_lr=1e-4)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.55)
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_no_weight_decay_on_norms_and_embedding():
    from moebal.model import MoEModel

    model = MoEModel(ModelConfig(vocab_size=64, seq_len=8, d_model=16, n_layers=1, n_heads=2,
                                 num_experts=4, expert_hidden=8))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "embed.weight" in no_decay_names
    assert all(n.endswith("weight") and "norm" in n or n == "embed.weight" for n in no_decay_names)
    assert {names[id(p)] for p in decay["params"]} >= {"blocks.0.attn.qkv.weight",
                                                       "blocks.0.ffn.experts.w1_EDF"}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_presets_are_valid_and_overrides_apply():
    assert {"micro", "tiny", "small", "paper-16e", "paper-64e"} <= set(PRESETS)
    model_cfg, train_cfg = get_preset("tiny")
    m2, t2 = apply_overrides(model_cfg, train_cfg,
                             ["lr=3e-3", "d_model=64", "router.aux_loss_coeff=0.1", "trace=true"])
    assert (t2.lr, m2.d_model, m2.router_options["aux_loss_coeff"], t2.trace) == (
        3e-3, 64, 0.1, True)
    assert get_preset("tiny")[0].d_model == model_cfg.d_model  # presets are not mutated
    with pytest.raises(ValueError, match="nope"):
        apply_overrides(model_cfg, train_cfg, ["nope=1"])
    with pytest.raises(ValueError, match="steps"):
        apply_overrides(model_cfg, train_cfg, ["steps=-1"])
    with pytest.raises(ValueError, match="huge"):
        get_preset("huge")


def test_bad_input_fails_before_training(corpus, tmp_path):
    model_cfg, train_cfg = micro(steps=4, eval_every=0, checkpoint_every=2)
    train(model_cfg, train_cfg, tmp_path / "run", data=corpus, progress=False)
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="already holds a run"):
        train(model_cfg, train_cfg, tmp_path / "run", data=corpus, progress=False)
    other = dataclasses.replace(train_cfg, lr=5e-3)
    with pytest.raises(ValueError, match=r"another configuration.*lr"):
        train(model_cfg, other, tmp_path / "run", data=corpus, progress=False, resume=True)
    with pytest.raises(ValueError, match="d_model"):
        train(dataclasses.replace(model_cfg, d_model=64), train_cfg, tmp_path / "run",
              data=corpus, progress=False, resume=True)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before
    with pytest.raises(ValueError, match="longer than the training data"):
        train(dataclasses.replace(model_cfg, seq_len=len(corpus.train)), train_cfg, data=corpus,
              progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        train(model_cfg, train_cfg, data=str(tmp_path / "missing"), progress=False)
    with pytest.raises(ValueError, match="trace_shards"):
        TrainConfig(batch_size=6, trace=True, trace_shards=4)
    with pytest.raises(ValueError, match="unknown balancer"):
        dataclasses.replace(model_cfg, balancer="nope")
    # --force starts over
    train(model_cfg, dataclasses.replace(train_cfg, steps=2), tmp_path / "run", data=corpus,
          progress=False, force=True)
    assert len(train_losses(tmp_path / "run")) == 2


def test_nonfinite_loss_stops_the_run(corpus, tmp_path, monkeypatch):
    model_cfg, train_cfg = micro(steps=6, eval_every=0)
    original = trainer_module.Trainer.micro_batch

    def poisoned(self, index):
        if self.step == 3:  # the 4th step: NaN weights -> NaN loss
            with torch.no_grad():
                self.model.embed.weight.fill_(float("nan"))
        return original(self, index)

    monkeypatch.setattr(trainer_module.Trainer, "micro_batch", poisoned)
    result = train(model_cfg, train_cfg, tmp_path / "run", data=corpus, progress=False)
    assert result.diverged_step == 4 and result.steps == 3
    assert result.divergence == "training loss is nan (diverged)"
    last = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert last["type"] == "diverged" and last["step"] == 4 and math.isnan(last["loss"])
    assert load_result(tmp_path / "run").diverged_step == 4


def test_a_non_finite_step_raises_and_changes_nothing(corpus):
    model_cfg, train_cfg = micro(steps=6, eval_every=0)
    t = Trainer(model_cfg, train_cfg, corpus)
    t.train_step()
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    original = t.micro_batch

    def poisoned(index):
        x_BS, y_BS = original(index)
        with torch.no_grad():
            t.model.embed.weight.fill_(float("inf"))
        return x_BS, y_BS

    t.micro_batch = poisoned
    with pytest.raises(NonFiniteLoss) as info:
        t.train_step()
    assert info.value.step == 2 and t.step == 1
    assert not math.isfinite(info.value.loss)
    state = t.model.state_dict()
    changed = {k for k, v in before.items() if not torch.equal(state[k], v)}
    assert changed == {"embed.weight", "lm_head.weight"}  # only what the test poisoned
    assert t.scheduler.last_epoch == 1  # no optimizer or schedule step


def test_cli_trains_and_reports(corpus, tmp_path, capsys):
    from moebal.cli import main as moebal_main
    from moebal.train.cli import main as module_main

    data = corpus.meta["data"]
    args = ["--preset", "micro", "--data", data, "--vocab-size", "512", "--steps", "3",
            "--cache-dir", str(corpus.directory.parent), "--quiet", "--trace",
            "--set", "eval_every=0", "--set", "trace_shards=2"]
    assert moebal_main(["train", *args, "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "val perplexity" in out and "MaxVio_global" in out
    assert load_trace(tmp_path / "a" / "trace.npz").counts.shape[:3] == (3, 2, 2)
    assert module_main([*args, "--out", str(tmp_path / "b")]) == 0  # python -m moebal.train
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b")
    assert module_main([*args, "--out", str(tmp_path / "c"), "--set", "nope=1"]) == 2
    assert module_main([*args, "--out", str(tmp_path / "c"), "--set", "trace=1"]) == 2
    assert "nope" in capsys.readouterr().err
