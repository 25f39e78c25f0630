"""`moebal compare`: every balancer trained alike, resumable, refusing foreign folders."""

from __future__ import annotations

import json
import random

import pytest

from moebal.cli import main
from moebal.report import build_document, load_results
from moebal.report.render import to_markdown
from moebal.report.compare import make_plan, parse_balancers, run_comparison

WORDS = (
    "the of and to a in is it you that he was for on are with as his they be at one have "
    "this from or had by word but what some we can out other were all there when up use "
    "your how said an each she which do their time if will way about many then them write "
    "would like so these her long make thing see him two has look more day could go come "
    "did number sound no most people my over know water than call first who may down side "
    "been now find king queen sword night light house river stone garden city war peace"
).split()

FAST = ["--preset", "micro", "--steps", "6", "--set", "eval_every=3", "--set", "eval_batches=1",
        "--no-progress"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """About 100 KB of English-like text: enough for a 512-token BPE and the micro preset."""
    rng = random.Random(0)
    lines = []
    for _ in range(2500):
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 12))]
        lines.append(" ".join(words).capitalize() + ".")
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("\n".join(lines))
    return str(path)


@pytest.fixture(autouse=True)
def corpus_cache(tmp_path_factory, monkeypatch):
    # one tokenizer cache for the whole module: the corpus is built once
    cache = tmp_path_factory.getbasetemp() / "moebal-cache"
    monkeypatch.setenv("MOEBAL_CACHE", str(cache))


def _plan(text_file, balancers="none,aux_loss", steps=6, **kw):
    return make_plan(balancers=balancers, preset="micro", steps=steps, data=text_file,
                     overrides=["eval_every=3", "eval_batches=1"], device="cpu",
                     command="test", **kw)


def test_compare_two_balancers_end_to_end(tmp_path, text_file, capsys):
    out = tmp_path / "cmp"
    rc = main(["compare", "--balancers", "none,aux_loss", "--data", text_file,
               "--out", str(out), *FAST])
    assert rc == 0
    results = load_results(out)
    assert [(r["method"], r["seed"], r["status"]) for r in results["runs"]] == [
        ("none", 0, "ok"), ("aux_loss", 0, "ok")]
    for run in results["runs"]:
        assert run["steps"] == 6 and run["val_ppl"] > 1
        assert len(run["series"]["max_vio_batch"]) == 6
        assert run["series"]["eval_step"] == [3, 6]
        assert run["load_snapshots"][0]["step"] == 1
        assert (out / run["run_dir"] / "run.json").is_file()
        assert not (out / run["run_dir"] / "checkpoint.pt").exists()
    assert results["config"]["balancer_options"]["aux_loss"] == {"aux_loss_coeff": 0.001}
    assert results["command"].startswith("moebal compare --preset micro --balancers none,aux_loss")
    for name in ("report.md", "report.html", "plots/max_vio_batch.png", "plots/val_ppl.png",
                 "plots/load_heatmaps.png", "plots/router_overhead.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    md = (out / "report.md").read_text()
    assert "| Aux loss (α=1e-3) | α=0.001 |" in md and "None (plain top-k)" in md
    assert "What this run says about the papers' claims" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and "plots/" not in html
    assert "report.md" in capsys.readouterr().out


def test_unknown_balancer_is_refused_before_training(tmp_path, text_file, capsys):
    out = tmp_path / "cmp"
    rc = main(["compare", "--balancers", "none,lossfree", "--out", str(out), *FAST])
    assert rc == 2
    err = capsys.readouterr().err
    assert "'lossfree'" in err and "loss_free" in err  # names the bad one, lists the known
    assert not out.exists()
    with pytest.raises(ValueError, match="twice"):
        parse_balancers("none,none")
    with pytest.raises(ValueError, match="not compared"):
        _plan(text_file, balancer_options=["bip.bip_iters=3"])
    with pytest.raises(ValueError, match="unknown router option"):
        _plan(text_file, balancer_options=["aux_loss.alpha=3"])


def test_foreign_output_folder_is_refused(tmp_path, text_file):
    out = tmp_path / "cmp"
    run_comparison(_plan(text_file), out, progress=False, report=False)  # none, aux_loss
    before = (out / "results.json").read_text()
    other = _plan(text_file, balancers="none", steps=5)
    with pytest.raises(ValueError, match="another experiment.*steps"):
        run_comparison(other, out, progress=False, report=False)
    with pytest.raises(ValueError, match="another experiment"):
        run_comparison(other, out, resume=True, progress=False, report=False)
    with pytest.raises(ValueError, match="another experiment.*aux_loss options"):
        run_comparison(_plan(text_file, balancer_options=["aux_loss.aux_loss_coeff=0.1"]), out,
                       resume=True, progress=False, report=False)
    with pytest.raises(ValueError, match="already holds this comparison.*--resume"):
        run_comparison(_plan(text_file), out, progress=False, report=False)
    assert (out / "results.json").read_text() == before  # refusals change nothing
    results = run_comparison(other, out, force=True, progress=False, report=False)
    assert results["config"]["steps"] == 5 and results["runs"][0]["steps"] == 5
    # aux_loss's folder still holds the first experiment's finished run: never reused
    results = run_comparison(_plan(text_file, steps=5), out, resume=True, progress=False,
                             report=False)
    assert [(r["method"], r["steps"]) for r in results["runs"]] == [("none", 5), ("aux_loss", 5)]


def test_resume_reuses_finished_runs_and_trains_the_rest(tmp_path, text_file, monkeypatch):
    import moebal.train as train_mod

    out = tmp_path / "cmp"
    calls = []
    real_train = train_mod.train

    def interrupted(model_cfg, *a, **kw):
        calls.append(model_cfg.balancer)
        if model_cfg.balancer == "aux_loss":
            raise KeyboardInterrupt
        return real_train(model_cfg, *a, **kw)

    monkeypatch.setattr(train_mod, "train", interrupted)
    methods = "loss_free,aux_loss"
    with pytest.raises(KeyboardInterrupt):
        run_comparison(_plan(text_file, methods), out, progress=False, report=False)
    first = load_results(out)
    assert [r["method"] for r in first["runs"]] == ["loss_free"]
    with pytest.raises(ValueError, match="--resume"):  # no silent restart
        run_comparison(_plan(text_file, methods), out, progress=False, report=False)

    calls.clear()
    monkeypatch.setattr(train_mod, "train", lambda cfg, *a, **kw: (calls.append(cfg.balancer),
                                                                   real_train(cfg, *a, **kw))[1])
    results = run_comparison(_plan(text_file, methods), out, resume=True, progress=False,
                             report=False)
    assert calls == ["aux_loss"]  # the finished run was read back, not trained again
    assert [r["method"] for r in results["runs"]] == ["loss_free", "aux_loss"]
    assert results["runs"][0] == first["runs"][0]


def test_a_diverging_method_is_marked_failed_and_the_others_go_on(tmp_path, text_file,
                                                                  monkeypatch):
    from moebal.model import MoEModel

    real_forward = MoEModel.forward
    seen = {"n": 0}

    def forward(self, tokens_BS, targets_BS=None):
        out = real_forward(self, tokens_BS, targets_BS)
        if self.training and self.config.balancer == "aux_loss":
            seen["n"] += 1
            if seen["n"] >= 4:  # the 4th training step's loss is NaN
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MoEModel, "forward", forward)
    out = tmp_path / "cmp"
    results = run_comparison(_plan(text_file, balancers="aux_loss,none"), out, progress=False,
                             report=False)
    aux, none = results["runs"]
    assert aux["status"] == "failed" and aux["failure"]["step"] == 4
    assert "nan" in aux["failure"]["reason"].lower()
    assert aux["series"]["step"] == [1, 2, 3]
    assert none["status"] == "ok" and none["steps"] == 6
    assert load_results(out)["runs"] == results["runs"]
    md = to_markdown(build_document(results, plots={}))
    assert "Aux loss (α=1e-3), seed 0: stopped at step 4" in md
    assert "0 / 1" not in md and "0/1 (failed: seed 0 at step 4) |" in md


def _numbers(row):
    return {k: v for k, v in row.items()
            if k not in ("train_seconds", "wall_seconds", "tokens_per_s", "router_time_share")}


def test_a_run_with_a_damaged_checkpoint_or_an_error_is_trained_again(tmp_path, text_file,
                                                                      monkeypatch):
    import moebal.train as train_mod

    out = tmp_path / "cmp"
    first = run_comparison(_plan(text_file), out, keep_checkpoints=True, progress=False,
                           report=False)
    aux_dir = out / "runs" / "aux_loss" / "seed0"
    (aux_dir / "run.json").unlink()  # interrupted before it was recorded ...
    ckpt = aux_dir / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:200])  # ... with a truncated checkpoint
    again = run_comparison(_plan(text_file), out, resume=True, progress=False, report=False)
    assert again["runs"][1]["status"] == "ok"  # not "failed" for good
    assert _numbers(again["runs"][1]) == _numbers(first["runs"][1])  # the same run again

    real_train = train_mod.train

    def broken(model_cfg, *a, **kw):
        if model_cfg.balancer == "aux_loss":
            raise RuntimeError("out of memory")
        return real_train(model_cfg, *a, **kw)

    (aux_dir / "run.json").unlink()
    monkeypatch.setattr(train_mod, "train", broken)
    failed = run_comparison(_plan(text_file), out, resume=True, progress=False, report=False)
    assert failed["runs"][1]["status"] == "failed"
    assert failed["runs"][1]["failure"]["kind"] == "error"
    monkeypatch.setattr(train_mod, "train", real_train)
    retried = run_comparison(_plan(text_file), out, resume=True, progress=False, report=False)
    assert retried["runs"][1]["status"] == "ok"  # an error is tried again on --resume
    assert _numbers(retried["runs"][1]) == _numbers(first["runs"][1])


def test_compare_fails_when_every_run_failed(tmp_path, text_file, monkeypatch, capsys):
    from moebal.model import MoEModel

    real_forward = MoEModel.forward

    def forward(self, tokens_BS, targets_BS=None):
        out = real_forward(self, tokens_BS, targets_BS)
        if self.training:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MoEModel, "forward", forward)
    rc = main(["compare", "--balancers", "none,aux_loss", "--data", text_file,
               "--out", str(tmp_path / "cmp"), *FAST])
    assert rc == 1
    assert "every run failed" in capsys.readouterr().err
    rows = load_results(tmp_path / "cmp")["runs"]
    assert [r["failure"]["kind"] for r in rows] == ["diverged", "diverged"]
