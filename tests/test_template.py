"""Prompt templates are data: only {instruction} and {input} are replaced; a template that cannot be used is
refused, in one line, when the checkpoint is read."""

import pytest

from bdh_mlx import BDH, BDHConfig, cli
from bdh_mlx.errors import CheckpointError, ConfigError
from bdh_mlx.inference.template import ALPACA_TEMPLATE, MAX_END_CHARS, check_template, format_prompt
from bdh_mlx.storage import checkpoint
from bdh_mlx.storage import format as checkpoint_format

TINY = dict(n_layer=2, n_embd=32, n_head=2, mlp_internal_dim_multiplier=8)


def test_only_the_named_placeholders_are_replaced_and_everything_else_is_kept():
    template = {"prompt": "{foo} {0} { {instruction:zz} {{x}} {instruction}!", "end": "$",
                "prompt_input": "{input}|{instruction}|{instruction[99]}"}
    check_template(template)
    assert format_prompt(template, "do {input}") == "{foo} {0} { {instruction:zz} {{x}} do {input}!"
    assert format_prompt(template, "i {0}", "n {instruction}") == "n {instruction}|i {0}|{instruction[99]}"


def test_a_prompt_is_as_long_as_its_template_plus_the_texts_in_it():
    instruction, input = "x" * 1000, "y" * 500
    prompt = format_prompt(ALPACA_TEMPLATE, instruction, input)
    assert len(prompt) == len(ALPACA_TEMPLATE["prompt_input"]) - len("{instruction}{input}") + 1500
    assert prompt == ALPACA_TEMPLATE["prompt_input"].replace("{instruction}", instruction).replace("{input}", input)


HOSTILE = {
    "a huge format width": ({"prompt": "{instruction:>2000000000}"}, "prompt must hold {instruction} once each"),
    "an unknown field": ({"prompt": "{foo}"}, "prompt must hold {instruction} once each"),
    "a positional field": ({"prompt_input": "{0}"}, "prompt_input must hold {instruction} and {input} once each"),
    "an unclosed brace": ({"prompt": "{instruction"}, "prompt must hold {instruction} once each"),
    "an index": ({"prompt": "{instruction[99]}"}, "prompt must hold {instruction} once each"),
    "a bad format spec": ({"prompt": "{instruction:zz}"}, "prompt must hold {instruction} once each"),
    "the instruction twice": ({"prompt": "{instruction}" * 4000}, "prompt must hold {instruction} once each"),
    "no input": ({"prompt_input": "{instruction}"}, "prompt_input must hold {instruction} and {input} once each"),
    "an input in prompt": ({"prompt": "{instruction}{input}"}, "prompt must hold {instruction} once each"),
    "an empty end": ({"end": ""}, f"end (the end-of-response marker) must be 1 to {MAX_END_CHARS} characters, got 0"),
    "a long end": ({"end": "e" * 40_000}, f"must be 1 to {MAX_END_CHARS} characters, got 40,000"),
    "a number": ({"prompt": 7}, "prompt_template must map prompt, prompt_input and end to strings"),
    "a list": (["{instruction}"], "prompt_template must map prompt, prompt_input and end to strings"),
}


def hostile_checkpoint(path, template):
    """A tiny checkpoint whose config holds ``template`` (written without the config's check)."""
    model = BDH(BDHConfig(**TINY))
    config = BDHConfig(**TINY)
    config.prompt_template = template
    checkpoint_format.save_weights(path, config, checkpoint_format.model_weights(model))
    return path


@pytest.mark.parametrize("case", HOSTILE)
def test_a_template_that_cannot_be_used_is_refused_when_the_checkpoint_is_read(tmp_path, case, capsys):
    change, message = HOSTILE[case]
    template = {**ALPACA_TEMPLATE, **change} if isinstance(change, dict) else change
    path = hostile_checkpoint(tmp_path / "bad.npz", template)
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(path)
    assert str(info.value).startswith(f"{path}: invalid config: ") and message in str(info.value)
    assert len(str(info.value)) < 400
    with pytest.raises(ConfigError):
        BDHConfig(**TINY, prompt_template=template)
    assert cli.main(["generate", "--model", str(path), "--instruction", "hi", "--max-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"bdh-mlx generate: error: {path}: invalid config: ")


def test_a_template_changed_after_loading_is_checked_before_use(tmp_path):
    model = BDH(BDHConfig(**TINY, prompt_template=dict(ALPACA_TEMPLATE)))
    model.config.prompt_template = {**ALPACA_TEMPLATE, "prompt": "{instruction:>2000000000}"}
    from bdh_mlx import apply_template

    with pytest.raises(ConfigError, match="prompt must hold"):
        apply_template(model, "hi")
