"""mergekit's named chat templates (chatml, llama3, mistral, alpaca, exaone): fastmerge's own
text for each renders every conversation here exactly as mergekit 0.1.5's file does under
transformers' chat-template environment (whitespace quirks included), and raises where it raises.
mergekit's files are read from the installed package at test time; skipped without it."""

from __future__ import annotations

import importlib.resources
import itertools

import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
chat_templates = pytest.importorskip("mergekit._data.chat_templates",
                                     reason="mergekit is not installed (pip install -e '.[test]')")

from fastmerge.errors import InvalidArgumentError  # noqa: E402
from fastmerge.merging.chat_templates import NAMED_TEMPLATES  # noqa: E402
from fastmerge.merging.vocabulary import chat_template_text  # noqa: E402

CONVERSATIONS = [
    [{"role": "user", "content": "Hello there"}],
    [{"role": "system", "content": "  Be brief.\n"}, {"role": "user", "content": " What is 2+2? "}],
    [{"role": "system", "content": "sys"}, {"role": "user", "content": "q1"},
     {"role": "assistant", "content": " a1 \n"}, {"role": "user", "content": "q2"}],
    [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}],
    [{"role": "user", "content": "line1\nline2\n\n"}, {"role": "assistant", "content": "\n a\tb "},
     {"role": "user", "content": ""}],
    [{"role": "user_context", "content": "ctx"}, {"role": "user", "content": "q"}],
    [{"role": "user", "content": "q"}, {"role": "user_context", "content": " ctx "},
     {"role": "assistant", "content": "r"}],
    [{"role": "system", "content": "s1"}, {"role": "system", "content": "s2"}, {"role": "user", "content": "q"}],
    [{"role": "assistant", "content": "starts"}],
    [{"role": "tool", "content": "t"}, {"role": "user", "content": "u"}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "system", "content": "only a system message"}],
]


@pytest.fixture(scope="module")
def tokenizer():
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")


def _render(tokenizer, template: str, conversation, generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(conversation, tokenize=False, chat_template=template,
                                             add_generation_prompt=generation_prompt)
    except Exception as exc:  # noqa: BLE001 - which error each template raises is compared
        return f"raised {type(exc).__name__}"


@pytest.mark.parametrize("name", sorted(NAMED_TEMPLATES))
def test_named_template_renders_as_mergekit(tokenizer, name):
    theirs = importlib.resources.files(chat_templates).joinpath(name + ".jinja").read_text()
    ours = chat_template_text(name, [])
    assert ours == NAMED_TEMPLATES[name] and ours != theirs
    rendered = 0
    for conversation, generation_prompt in itertools.product(CONVERSATIONS, (False, True)):
        want = _render(tokenizer, theirs, conversation, generation_prompt)
        assert _render(tokenizer, ours, conversation, generation_prompt) == want, (conversation, generation_prompt)
        rendered += not want.startswith("raised")
    assert rendered >= 10  # the comparison is over rendered text, not only errors


def test_mergekit_ships_no_other_named_template():
    shipped = {p.name.removesuffix(".jinja") for p in importlib.resources.files(chat_templates).iterdir()
               if p.name.endswith(".jinja")}
    assert shipped == set(NAMED_TEMPLATES)


@pytest.mark.parametrize("value", ["chatml2", "vicuna", "{{ x }}"])
def test_other_short_names_are_refused_naming_the_known_ones(value):
    with pytest.raises(InvalidArgumentError, match="chatml, exaone, llama3, mistral"):
        chat_template_text(value, [])
