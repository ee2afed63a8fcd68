"""explain.py shows what the trainer computes: the same reward terms, advantages, difficulty and loss,
on crafted rollouts (known texts) and on sampled ones; its HTML is well-formed; its CLI fails cleanly;
every `file.py:function` that docs/TOUR.md names exists."""

import copy
import html
import importlib
import json
import re
import shutil
from contextlib import ExitStack
from dataclasses import asdict, replace
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

from rerec_mini import explain as X
from rerec_mini import raae
from rerec_mini import trainer as T
from rerec_mini.config import REPO_ROOT, Config
from rerec_mini.curriculum import make_curriculum
from rerec_mini.sampling import Rollouts

pytestmark = pytest.mark.usefixtures("one_thread")
G = 5


@pytest.fixture(scope="module")
def trainer(micro_model, ds):
    # beta > 0 at start_rl: the trainer keeps a reference, so the KL path of the loss runs too.
    cfg = Config(model=micro_model, num_generations=G, max_completion_length=64, num_candidates=4,
                 show_attributes="auto", beta=0.02, micro_batch_size=2, learning_rate=1e-3, warmup_steps=1)
    tr = T.Trainer(cfg, ds, micro_model, torch.device("cpu"))
    tr.start_rl()
    return tr


def crafted_texts(tr, q):
    """Five answers to q whose fate is known: a hit, a wrong answer argued for, a format failure,
    a hallucinated title, and a hit whose reasoning attributes a missing value to another item."""
    cands = tr.candidates.sample(q, tr.cfg.num_candidates, tr.cfg.hard_negatives, seed=tr.cfg.seed,
                                 negatives=tr.cfg.negatives)
    gt = tr.ds.items[next(i for i in cands if i in q.ground_truth)]
    wrong = tr.ds.items[next(i for i in cands if i not in q.ground_truth)]
    rel, val = next(c for c in q.conditions if not wrong.has(*c))
    return [
        f"Needed: {rel}: {val}.\n{gt.title} has {rel}: {val}.\n\\boxed{{{gt.title}}}",
        f"Step 1: look for {val}. Step 2: {wrong.title} is the one.\n\\boxed{{{wrong.title}}}",
        "I like films.\nNo idea at all.",
        "Maybe this one.\n\\boxed{Nonexistent Film (1901)}",
        f"{wrong.title} has {rel}: {val}.\nSo the answer is clear.\n\\boxed{{{gt.title}}}",
    ], gt, wrong, (rel, val)


@pytest.fixture
def crafted(trainer, ds, monkeypatch):
    """Replace the sampler with one that 'samples' the crafted texts (the format failure cut off)."""
    q = ds.queries["train"][0]
    texts, gt, wrong, claim = crafted_texts(trainer, q)
    tok = trainer.tokenizer

    def fake_generate(model, prompts, *, num_samples, eos_token_id, **kw):
        comps = [tok.encode(t, add_special_tokens=False) + ([] if k == 2 else [eos_token_id[0]])
                 for _ in prompts for k, t in enumerate(texts[:num_samples])]
        return Rollouts(comps, [[-1.0] * len(c) for c in comps], [k == 2 for k in range(len(comps))],
                        [i // num_samples for i in range(len(comps))])

    monkeypatch.setattr(T, "generate", fake_generate)
    return q, texts, gt, wrong, claim


def trainers_numbers(tr, q):
    """What Trainer.step computes for q's rollouts, by the trainer's own calls."""
    b = tr.rollout(queries=[q])
    r = tr.score(b)
    adv = tr.advantages(b, r)
    return b, r, adv, tr.difficulties(r)


def assert_same_as_trainer(ex, r, adv, d, cfg):
    for k, ro in enumerate(ex.rollouts):
        assert (ro.format, ro.rec, ro.qas, ro.pas, ro.total) == (r.format[k], r.rec[k], r.qas[k], r.pas[k], r.total[k])
        assert ro.hit == bool(r.hit[k]) and [i for i, _ in ro.matched] == r.parsed[k]
        assert ro.hallucinated == r.n_hallucinated[k]
        assert ro.advantage == adv.sequence[k]
        np.testing.assert_array_equal(ro.token_advantages, adv.tokens[k])
        # The segments shown as wrong are exactly the tokens the trainer lowered.
        if cfg.raae_penalty > 0 and cfg.raae_advantage == "bounded":
            np.testing.assert_array_equal(ro.penalised, adv.tokens[k] != np.float32(adv.sequence[k]))
    assert ex.difficulty == d[0]
    _, mean, s = raae.sequence_advantages(r.total, cfg.num_generations, cfg.scale_rewards)
    assert (ex.group_mean, ex.group_scale) == (mean[0], s[0])
    assert ex.group_mean == pytest.approx(r.total.mean())
    if cfg.scale_rewards != "none":  # one query: its group is the whole batch
        assert ex.group_scale == pytest.approx(r.total.std() + 1e-4)


def test_crafted_rollouts_match_the_trainer(trainer, crafted):
    q, texts, gt, wrong, (_, val) = crafted
    ex = X.explain(trainer, q)
    b, r, adv, d = trainers_numbers(trainer, q)
    assert_same_as_trainer(ex, r, adv, d, trainer.cfg)
    assert [ro.text for ro in ex.rollouts] == texts == b.texts
    hit, wrong_ans, failed, halluc, claimed = ex.rollouts
    assert hit.hit and hit.rec == 1.0 and not any(s.wrong for s in hit.segments)
    # The wrong answer: only the step naming it is wrong, and its tokens get A - w*max(|A|, 1).
    segs = [(wrong_ans.text[s.start:s.end], s.wrong) for s in wrong_ans.segments]
    assert segs == [(f"Step 1: look for {val}.", False), (f"Step 2: {wrong.title} is the one.", True)]
    assert wrong.title in wrong_ans.segments[1].reason and not wrong_ans.hit
    A = wrong_ans.advantage
    assert wrong_ans.penalised_advantage == pytest.approx(A - 0.3 * max(abs(A), 1.0), abs=1e-6)
    assert wrong_ans.normal_advantage == pytest.approx(A, abs=1e-6) and wrong_ans.penalised.sum() > 0
    assert failed.boxed is None and (failed.format, failed.rec) == (-0.5, -0.5) and not failed.trained
    assert failed.loss_share == 0.0
    assert halluc.matched == [] and halluc.hallucinated == 1 and halluc.format == -0.5
    assert not any(s.wrong for s in claimed.segments)  # without --raae-claims a false claim passes


def test_false_claims_are_marked_with_raae_claims(trainer, crafted, monkeypatch):
    q, _, _, wrong, (rel, val) = crafted
    monkeypatch.setattr(trainer, "cfg", replace(trainer.cfg, raae_claims=True))
    ex = X.explain(trainer, q)
    _, r, adv, d = trainers_numbers(trainer, q)
    assert_same_as_trainer(ex, r, adv, d, trainer.cfg)
    claimed = ex.rollouts[4]
    assert [s.wrong for s in claimed.segments] == [True, False]
    assert claimed.segments[0].reason == f"claims {wrong.title} has {rel}: {val}, which it lacks"
    assert claimed.hit and claimed.penalised.sum() > 0


@pytest.mark.parametrize("switch", [
    {"loss_type": "dapo"}, {"loss_type": "grpo"}, {"loss_type": "dr_grpo"}, {"loss_type": "bnpo"},
    {"loss_type": "dapo", "tis_cap": 2.0, "keep_truncated": True, "scale_rewards": "batch"},
    {"loss_type": "grpo", "beta": 0.0, "raae_advantage": "paper"},
])
def test_loss_shares_add_up_to_the_steps_loss(trainer, crafted, monkeypatch, switch):
    """Each rollout packed alone under the step's StepNorm: the shares sum to what update() backprops."""
    q = crafted[0]
    monkeypatch.setattr(trainer, "cfg", replace(trainer.cfg, **switch))
    ex = X.explain(trainer, q)
    b, r, adv, d = trainers_numbers(trainer, q)
    assert_same_as_trainer(ex, r, adv, d, trainer.cfg)
    assert ex.rollouts[2].trained == trainer.cfg.keep_truncated
    rows = trainer.trained_rows(b)
    assert ex.norm.seqs == len(rows) and ex.norm.tokens == sum(len(b.completions[k]) for k in rows)
    stats = trainer.update(b, adv.tokens)  # one real update (it moves the weights: later tests see KL > 0)
    assert ex.step_loss == pytest.approx(stats["loss"], rel=1e-5, abs=1e-7)
    assert sum(ro.loss_share for ro in ex.rollouts) == pytest.approx(ex.step_loss)


def test_curriculum_is_asked_on_a_copy(trainer, crafted, monkeypatch):
    q = crafted[0]
    before = copy.deepcopy(trainer.curriculum.state_dict())
    ex = X.explain(trainer, q)
    assert trainer.curriculum.state_dict() == before
    assert ex.curriculum.training_index == 0 and ex.curriculum.before is None
    assert ex.curriculum.after == ex.difficulty and any("bucket unseen ->" in ln for ln in ex.curriculum.lines)
    # paper: next epoch retires the query iff d < tau, else it leads the easy -> hard order (the
    # others were never rolled out: they sort as hardest)
    paper = make_curriculum("paper", len(trainer.train_queries), tau=0.1, batch_size=2)
    monkeypatch.setattr(trainer, "curriculum", paper)
    n = len(trainer.train_queries)
    for tau, expect in ((0.99, "next epoch: retired"), (0.1, f"next epoch: kept at position 1 of {n}")):
        monkeypatch.setattr(trainer, "cfg", replace(trainer.cfg, curriculum="paper", tau=tau))
        paper.tau = tau
        ex = X.explain(trainer, q)
        assert ex.difficulty == pytest.approx(0.6)  # rec 1, 0, failed, failed, 1
        assert any(ln.startswith(expect) for ln in ex.curriculum.lines), ex.curriculum.lines
        assert paper.order == [] and np.isnan(paper.difficulty).all()


class Balanced(HTMLParser):
    """Checks that every non-void tag is closed in order; collects the ids."""

    VOID = {"meta", "br", "hr", "img", "input", "link", "wbr"}

    def __init__(self):
        super().__init__()
        self.stack, self.ids, self.errors = [], [], []

    def handle_starttag(self, tag, attrs):
        self.ids += [v for k, v in attrs if k == "id"]
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def check_html(page: str, n_rollouts: int) -> Balanced:
    parser = Balanced()
    parser.feed(page)
    parser.close()
    assert not parser.errors and not parser.stack
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page and "http" not in page
    assert [f"rollout-{k}" for k in range(1, n_rollouts + 1)] == [i for i in parser.ids if i.startswith("rollout-")]
    return parser


def test_html_is_well_formed_and_holds_every_rollout(trainer, crafted):
    q, texts, *_ = crafted
    ex = X.explain(trainer, q)
    page = X.render_html(ex)
    check_html(page, G)
    for t in texts:  # every segment of every rollout, escaped
        for a, e in raae.segment(t):
            assert html.escape(t[a:e]) in page
    assert page.count('class="wrong"') >= 2  # the wrong step of rollout 2: its tokens and its segment
    text = X.render_text(ex, color=False)
    assert "\033" not in text and "\x1b" not in text and all(f" #{k} " in text for k in range(1, G + 1))
    assert "\x1b[" in X.render_text(ex, color=True)


def test_cli_on_a_sampled_step_writes_plain_text_and_html(micro_model, tmp_path, capsys):
    out = tmp_path / "step.html"
    rc = X.main(["--model", micro_model, "--query", "train-implicit-00040", "--num-generations", "2",
                 "--max-completion-length", "8", "--num-candidates", "3", "--keep-truncated", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "\x1b[" not in text  # captured stdout is not a TTY: no colour
    assert "train-implicit-00040 (implicit, train split)" in text and "hop " in text and " #2 " in text
    check_html(out.read_text(), 2)


def test_cli_tiny_says_it_is_untrained(capsys):
    rc = X.main(["--model", "tiny", "--tiny-hidden", "16", "--tiny-layers", "1", "--tiny-vocab", "300",
                 "--no-tiny-units", "--num-generations", "2", "--max-completion-length", "4"])
    text = capsys.readouterr().out
    assert rc == 0 and "untrained tiny model" in text


def test_a_checkpoint_brings_its_config_step_and_curriculum(micro_model, tmp_path, ds):
    """A checkpoint taken during RL: its settings are the defaults, its step seeds the sampler and its
    curriculum holds the query's difficulty history (the EMA continues from it)."""
    ckpt = tmp_path / "run" / "checkpoint-7"
    shutil.copytree(micro_model, ckpt)
    cfg = Config(model="tiny", output_dir=str(tmp_path / "run"), num_generations=3, num_candidates=3,
                 max_completion_length=6, beta=0.0, curriculum="buckets")
    cur = make_curriculum("buckets", len(ds.queries["train"]), total_steps=cfg.max_steps)
    cur.update([0], [0.5])
    (ckpt / "trainer_state").mkdir()
    (ckpt / "trainer_state" / "state.json").write_text(json.dumps(
        {"phase": "rl", "step": 7, "config": asdict(cfg), "curriculum": cur.state_dict()}))
    with ExitStack() as stack:
        tr, q, notes, _ = X.setup(["--model", str(ckpt), "--max-completion-length", "5"], stack)
    assert (tr.cfg.num_generations, tr.cfg.num_candidates, tr.cfg.max_completion_length) == (3, 3, 5)
    assert tr.step_no == 7 and q.query_id == ds.queries["train"][0].query_id
    ex = X.explain(tr, q, notes)
    assert len(ex.rollouts) == 3 and ex.curriculum.before == 0.5
    assert ex.curriculum.after == pytest.approx(0.5 * ex.difficulty + 0.5 * 0.5)
    assert ex.model == str(ckpt) and ex.settings["step"] == 7


def test_text_request_becomes_an_explicit_query_with_a_ground_truth(ds):
    q, assumed = X.text_query("Horror movies made in Japan, please", ds)
    assert q.type == "explicit" and set(q.conditions) == {("genre", "Horror"), ("country", "Japan")}
    assert q.ground_truth and all(ds.items[i].has(*c) for i in q.ground_truth for c in q.conditions)
    everyone = [i for i, it in ds.items.items() if all(it.has(*c) for c in q.conditions)]
    assert sorted(q.ground_truth) == sorted(everyone) and "no ground truth" in assumed


@pytest.mark.parametrize("argv, says", [
    (["--model", "tiny", "--query", "no-such-query"], "--query no-such-query: not a query"),
    (["--model", "/nonexistent/model/dir"], "--model /nonexistent/model/dir"),
    (["--model", "tiny", "--data", "/nonexistent/data"], "--data /nonexistent/data: no such directory"),
    (["--model", "tiny", "--text", "zzz qqq"], "names no attribute value"),
    (["--model", "tiny", "--text", "Horror", "--query", "x"], "not both"),
])
def test_usage_errors_exit_2_with_one_line(argv, says, capsys):
    assert X.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err and err.count("\n") == 1


def test_tour_references_resolve():
    """Every `file.py:function` in docs/TOUR.md names a module of rerec_mini and an attribute in it."""
    tour = (REPO_ROOT / "docs" / "TOUR.md").read_text()
    refs = set(re.findall(r"\b([a-z_]+)\.py:([A-Za-z_][\w.]*\w)", tour))
    assert len(refs) >= 15
    for module, dotted in sorted(refs):
        obj = importlib.import_module(f"rerec_mini.{module}")
        for name in dotted.split("."):
            assert hasattr(obj, name), f"docs/TOUR.md: {module}.py:{dotted} does not exist"
            obj = getattr(obj, name)
