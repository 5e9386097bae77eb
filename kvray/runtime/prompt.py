"""The prompt layout (kvpress's, so numbers are comparable): the chat template holds one user
turn `context + question`, the assistant turn starts with `answer_prefix`. The context part is
compressed in both protocols; question + suffix are fed after compression (query-agnostic) or
compressed too (query-aware)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PromptTokens:
    """Token ids of one prompt, split where the protocols need it."""

    context: list[int]   # template prefix + context: compressed in both protocols
    question: list[int]  # the question
    suffix: list[int]    # end of the user turn, assistant header, answer_prefix
    template_suffix: tuple = ()  # the suffix without the answer prefix (which may name the query's key)
    #: leading tokens of `context` that belong to the chat template (system prompt, user header),
    #: not to the context text: 0 without a chat template
    template_prefix: int = 0

    @property
    def rest(self) -> list[int]:
        """What follows the context: question + suffix."""
        return self.question + self.suffix

    def __len__(self) -> int:
        return len(self.context) + len(self.question) + len(self.suffix)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def build_prompt(tokenizer, context: str, question: str, answer_prefix: str = "") -> PromptTokens:
    """The prompt's tokens in kvpress's layout (see the module docstring). `template_prefix` is
    the common prefix of the context part with the template text before the context tokenised
    alone, so a token straddling the boundary counts as context."""
    sep = "" if not question or question[:1].isspace() else "\n\n"
    q_text = sep + question
    pre_str = ""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": context + q_text}], add_generation_prompt=True, tokenize=False
        )
        start = text.find(context + q_text)
        if start < 0:
            raise ValueError("the chat template changed the user message; cannot split context and question")
        ctx_end = start + len(context)
        q_end = ctx_end + len(q_text)
        ctx_str, q_str, template_str = text[:ctx_end], text[ctx_end:q_end], text[q_end:]
        pre_str = text[:start]
    else:
        ctx_str, q_str, template_str = context, q_text, "\n"
    suffix_str = template_str + answer_prefix

    def enc(s: str) -> list[int]:
        return tokenizer(s, add_special_tokens=False).input_ids if s else []

    ctx = enc(ctx_str)
    if not ctx:
        raise ValueError("empty context: nothing to compress")
    skip = min(_common_prefix(enc(pre_str), ctx), len(ctx) - 1) if pre_str else 0
    bos = _leading_bos(tokenizer)
    if not pre_str and bos is not None:  # the plain layout: the BOS the tokenizer itself would add (Gemma needs it)
        ctx, skip = [bos, *ctx], 1
    return PromptTokens(ctx, enc(q_str), enc(suffix_str), tuple(enc(template_str)), skip)


def _leading_bos(tokenizer) -> int | None:
    """The BOS id when the tokenizer puts one in front of a text by default, else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a").input_ids
    return bos if ids and ids[0] == bos else None


def stop_token_ids(tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for tok in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "</s>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return ids
