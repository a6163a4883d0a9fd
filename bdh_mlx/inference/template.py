"""The prompt template of instruction-tuned models, stored in their config (``BDHConfig.prompt_template``).

``bdh-mlx finetune`` trains on ``prompt + response + end`` and stores the template it used, so that
``generate --instruction`` and ``chat`` wrap text exactly as the model saw it and stop at ``end``.
"""

from bdh_mlx.errors import ConfigError

# The Alpaca layout without its one-sentence preamble (~100 bytes that byte-level models would pay for on every
# example), and an end-of-response marker that ordinary text does not contain.
ALPACA_TEMPLATE = {
    "prompt": "### Instruction:\n{instruction}\n\n### Response:\n",
    "prompt_input": "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
    "end": "<|end|>",
}


def format_prompt(template: dict, instruction: str, input: str | None = None) -> str:
    """The prompt for ``instruction`` (and ``input``, when non-empty) in ``template``."""
    if input:
        return template["prompt_input"].format(instruction=instruction, input=input)
    return template["prompt"].format(instruction=instruction)


def stored_template(model) -> dict:
    """The template ``model`` was fine-tuned with; a clear error for a model that was not."""
    template = model.config.prompt_template
    if template is None:
        raise ConfigError("this checkpoint has no prompt template: it was not fine-tuned with bdh-mlx finetune "
                          "(continue plain text with generate --prompt)")
    return template


def apply_template(model, instruction: str, input: str | None = None) -> str:
    """``instruction`` (and ``input``) wrapped in the template ``model`` was fine-tuned with.

    Generate with ``stop=[end_of_response(model)]`` to end at the model's end-of-response marker.
    """
    return format_prompt(stored_template(model), instruction, input)


def end_of_response(model) -> str:
    """The marker that ends a response of an instruction-tuned ``model``."""
    return stored_template(model)["end"]


def history_text(turns: list) -> str:
    """Earlier turns of a conversation as the template's input: one ``Role: content`` paragraph per turn.

    This is how a multi-turn ``messages`` example and ``chat --history`` present what came before.
    """
    return "\n\n".join(f"{turn['role'].capitalize()}: {turn['content']}" for turn in turns)
