"""Conversations to token ids and labels: the tokenizer's own chat template, or lowbit's built-in format.

With a chat template (the tokenizer's, or ``data.chat_template``) a conversation is rendered by
``apply_chat_template`` exactly as at inference and tokenized once. The trained tokens are those of each
assistant turn: its text plus the end-of-turn marker the template writes after it (``<|im_end|>``,
``<|eot_id|>``, ``</s>``, ...), so the model learns to stop. The span is located in the rendered text and
mapped to tokens through the tokenizer's character offsets; locating the text rather than diffing renders
of growing prefixes also works for templates that render earlier turns differently once later ones
follow (Qwen3 drops old reasoning). System messages stay system messages: the template decides.

Without a template (lowbit's own BPE, GPT-2-like tokenizers) the built-in format is used:
``<|system|> text <|user|> text <|assistant|> response <eos>``, where a marker that is not a token of the
vocabulary is tokenized as text. Either way every problem names the record (``file:line``) and the key.
"""
from __future__ import annotations

import os

from .corpus import DataError

IGNORE = -100
ROLES = ("system", "user", "assistant")
MARKERS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}


def check_messages(messages, where: str) -> list[dict]:
    """A conversation as a list of {role, content} dicts with string content and at least one non-empty
    assistant turn; raises DataError naming ``where`` and the offending key."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise DataError(f"{where}: messages[{i}].role: expected a string role (system, user, assistant)")
        if not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{i}].content: expected a string")
        if m["role"] == "assistant" and not m["content"].strip():
            raise DataError(f"{where}: messages[{i}].content: empty assistant response")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: messages: no assistant message to train on")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def resolve_template(tok, setting: str | None) -> str | None:
    """The Jinja template to use: ``data.chat_template`` (a file; ``builtin`` = none), else the tokenizer's.
    A template read from a file is also set on the tokenizer, so checkpoints and the export carry it."""
    if setting == "builtin":
        return None
    if setting:
        if not os.path.isfile(setting):
            raise DataError(f"data.chat_template: no such file {setting!r} (a Jinja chat template, or 'builtin')")
        with open(setting, encoding="utf-8") as f:
            tok.chat_template = f.read()
    return getattr(tok, "chat_template", None) or None


class ChatEncoder:
    """``encode(messages, where) -> (ids, labels)``, untruncated; labels are IGNORE off the assistant turns.

    ``template``: ``"auto"`` (the tokenizer's own, if any), None (the built-in format) or Jinja text."""

    def __init__(self, tok, template: str | None = "auto"):
        self.tok = tok
        self.template = resolve_template(tok, None) if template == "auto" else template
        if self.template is None and tok.eos_token_id is None:
            raise DataError("the tokenizer defines no eos token, which the built-in chat format ends each "
                            "response with; give it one or use a chat template (data.chat_template)")

    def encode(self, messages: list[dict], where: str) -> tuple[list[int], list[int]]:
        messages = check_messages(messages, where)
        return self._templated(messages, where) if self.template else self._builtin(messages, where)

    # ---- built-in format -----------------------------------------------------------------------
    def _marker(self, role: str) -> list[int]:
        tok, text = self.tok, MARKERS[role]
        tid = tok.convert_tokens_to_ids(text)
        if tid is not None and tid != tok.unk_token_id:
            return [tid]
        return list(tok(text, add_special_tokens=False)["input_ids"])

    def _builtin(self, messages: list[dict], where: str) -> tuple[list[int], list[int]]:
        ids, labels = [], []
        for i, m in enumerate(messages):
            if m["role"] not in ROLES:
                raise DataError(f"{where}: messages[{i}].role: {m['role']!r} is not a role of the built-in chat "
                                f"format ({', '.join(ROLES)}); a tokenizer chat template may know it")
            body = list(self.tok(m["content"], add_special_tokens=False)["input_ids"])
            mark = self._marker(m["role"])
            if m["role"] == "assistant":
                ids += mark + body + [self.tok.eos_token_id]
                labels += [IGNORE] * len(mark) + body + [self.tok.eos_token_id]
            else:
                ids += mark + body
                labels += [IGNORE] * (len(mark) + len(body))
        return ids, labels

    # ---- chat template -------------------------------------------------------------------------
    def _render(self, messages: list[dict], where: str) -> str:
        try:
            return self.tok.apply_chat_template(messages, chat_template=self.template, tokenize=False)
        except Exception as e:  # jinja2 raises TemplateError / the template's own raise_exception
            bad = self._first_bad(messages)
            key = f"messages[{bad}].role ({messages[bad]['role']!r})" if bad is not None else "messages"
            raise DataError(f"{where}: {key}: the chat template rejects the conversation: {e}") from None

    def _first_bad(self, messages: list[dict]) -> int | None:
        for k in range(1, len(messages) + 1):
            if self._try_render(messages[:k]) is None:
                return k - 1
        return None

    def _try_render(self, messages: list[dict], generation: bool = False) -> str | None:
        """A render of part of a conversation, or None where the template refuses it (e.g. a template that
        wants alternating roles asked for a prefix ending in a system turn)."""
        try:
            return self.tok.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                add_generation_prompt=generation)
        except Exception:
            return None

    def _spans(self, messages: list[dict], text: str, where: str) -> list[tuple[int, int]]:
        """Character spans of the assistant turns (text + end-of-turn marker) in the rendered ``text``."""
        spans, cursor = [], 0
        for i, m in enumerate(messages):
            content = m["content"]
            if content.strip() and content.strip() not in text:
                raise DataError(f"{where}: messages[{i}].role: the chat template does not render role "
                                f"{m['role']!r} (its content is missing from the output)")
            if m["role"] != "assistant":
                continue
            # Start the search where the render of the conversation before this turn stops agreeing.
            before = self._try_render(messages[:i], generation=True) if i else ""
            cursor = max(cursor, len(os.path.commonprefix([text, before or ""])))
            for piece in (content, content.strip()):
                start = text.find(piece, cursor)
                if start >= 0:
                    break
            else:
                raise DataError(f"{where}: messages[{i}].content: the chat template changes the assistant text, "
                                "so its tokens cannot be located")
            end = start + len(piece)
            # What the template writes right after the turn (its end-of-turn marker), minus trailing whitespace.
            alone = self._try_render(messages[:i + 1]) or ""
            tail = alone[alone.rfind(piece) + len(piece):].rstrip() if piece in alone else ""
            if tail and text.startswith(tail, end):
                end += len(tail)
            spans.append((start, end))
            cursor = end
        return spans

    def _templated(self, messages: list[dict], where: str) -> tuple[list[int], list[int]]:
        text = self._render(messages, where)
        spans = self._spans(messages, text, where)
        if getattr(self.tok, "is_fast", False):
            enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
            ids = list(enc["input_ids"])
            keep = [any(s < b and e > a for a, b in spans) for s, e in enc["offset_mapping"]]  # token overlaps a span
        else:  # slow tokenizers have no offsets: tokenize prompt and response pieces separately
            ids, keep, pos = [], [], 0
            for a, b in spans + [(len(text), len(text))]:
                for piece, trained in ((text[pos:a], False), (text[a:b], True)):
                    if piece:
                        part = list(self.tok(piece, add_special_tokens=False)["input_ids"])
                        ids += part
                        keep += [trained] * len(part)
                pos = b
        labels = [t if k else IGNORE for t, k in zip(ids, keep)]
        if all(x == IGNORE for x in labels):
            raise DataError(f"{where}: no assistant token left after applying the chat template")
        return ids, labels
