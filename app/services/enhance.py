"""Prompt enhancers behind ``POST /infer_api/v1/projects/{p}/models/{m}/enhance-prompt``.

Two kinds with one interface, so the route does not care which a model is configured with:

- :class:`TemplateEnhancer`: deterministic and instant, no model. It adds the model's trigger words, its style and a
  few quality words, or fills a per-model template.
- :class:`ChatEnhancer`: asks any OpenAI-compatible ``/v1/chat/completions`` upstream to rewrite the prompt, then makes
  sure the trigger words survived.

Both have ``async def enhance(prompt, *, style, trigger_words, template) -> Enhanced`` and ``async def close()``.

Attributes:
    QUALITY_WORDS: What the template enhancer appends to every prompt that lacks them.
    MAX_PROMPT_CHARS: The template enhancer's output cap; it only ever drops its own additions to meet it.
    DEFAULT_SYSTEM_PROMPT: The chat enhancer's instructions before the per-request style and trigger-word lines.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import aiohttp

QUALITY_WORDS: tuple[str, ...] = ("highly detailed", "sharp focus", "professional lighting")
MAX_PROMPT_CHARS = 1000
TEMPLATE_FIELDS = frozenset({"prompt", "style", "trigger"})

DEFAULT_SYSTEM_PROMPT = (
    "You rewrite prompts for a text-to-image model. Expand the user's prompt into one vivid, concrete description of "
    "the picture: subject, setting, composition, lighting, colours and medium. Keep the user's intent and everything "
    "they name. Answer with the prompt only, as one paragraph of at most 80 words: no preamble, no quotes, no lists."
)

_QUOTES = "\"'`“”‘’«»"  # the typographic ones too: chat models like them


class UpstreamFailed(Exception):
    """The chat upstream could not be reached, timed out, or did not answer with a chat completion."""


@dataclass(frozen=True)
class Enhanced:
    """One enhanced prompt.

    Attributes:
        original: The caller's prompt, stripped.
        enhanced: The prompt to generate with.
        method: "template" or "llm": which kind of enhancer wrote it.
    """

    original: str
    enhanced: str
    method: Literal["template", "llm"]


class Enhancer(Protocol):
    """What the enhance-prompt route needs of an enhancer."""

    async def enhance(
        self, prompt: str, *, style: str = "", trigger_words: Sequence[str] = (), template: str = ""
    ) -> Enhanced:
        """Enhance ``prompt`` for a model with this style, trigger words and template."""
        ...

    async def close(self) -> None:
        """Release what the enhancer holds (connections)."""
        ...


def check_template(template: str) -> None:
    """Check a prompt template before it is used, so a config mistake fails at start-up, not per request.

    A template is a :meth:`str.format` string with the fields ``{prompt}`` (required), ``{style}`` and ``{trigger}``
    (the trigger words, comma-separated). Literal braces are written ``{{`` and ``}}``.

    Args:
        template: The template to check.

    Raises:
        ValueError: The template does not parse, lacks ``{prompt}``, names any other field (positional ``{}``,
            attribute or index access included), or gives a field a conversion or format spec.
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"prompt template {template!r} does not parse: {e}") from None
    fields = [name for _, name, _, _ in parsed if name is not None]
    unknown = sorted({name for name in fields if name not in TEMPLATE_FIELDS})
    if unknown:
        names = ", ".join("{" + name + "}" for name in unknown)
        raise ValueError(
            f"prompt template {template!r} has unknown placeholder(s) {names}: use {{prompt}}, "
            "{style} and {trigger}"
        )
    if any(conv or spec for _, name, spec, conv in parsed if name is not None):
        raise ValueError(f"prompt template {template!r}: placeholders take no conversion or format spec")
    if "prompt" not in fields:
        raise ValueError(f"prompt template {template!r} lacks {{prompt}}")


def _has(text: str, phrase: str) -> bool:
    # A whole-word match, so the trigger "tok" is not found in "token"; lookarounds rather than \b because trigger
    # words may start or end with punctuation ("<lora:x>", "ohwx.").
    return re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", text, re.IGNORECASE) is not None


def _clean(text: str) -> str:
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s*,(?:\s*,)*\s*", ", ", text)  # ",," and " , ," become one ", "
    return text.strip(" ,")


def _phrases(items: Iterable[str]) -> list[str]:
    out: list[str] = []
    for item in items:
        phrase = _clean(item)
        if phrase and not any(p.lower() == phrase.lower() for p in out):
            out.append(phrase)
    return out


def _missing(text: str, phrases: Iterable[str]) -> list[str]:
    missing: list[str] = []
    for phrase in phrases:
        if not _has(text, phrase) and not any(_has(m, phrase) for m in missing):
            missing.append(phrase)
    return missing


def _prompt(prompt: str) -> str:
    prompt = prompt.strip()
    if not prompt:
        raise ValueError("prompt is empty")
    return prompt


def _with_triggers(text: str, trigger_words: Sequence[str]) -> str:
    missing = _missing(text, _phrases(trigger_words))
    return _clean(", ".join([*missing, text]))


class TemplateEnhancer:
    """Deterministic enhancement: trigger words first, then the prompt, the style and quality words; or a template."""

    async def enhance(
        self, prompt: str, *, style: str = "", trigger_words: Sequence[str] = (), template: str = ""
    ) -> Enhanced:
        """Enhance ``prompt`` without a model.

        Without a template: the trigger words the prompt lacks go in front, the style's comma-separated phrases and
        :data:`QUALITY_WORDS` it lacks go behind (case-insensitive whole-word matches), and repeated commas and spaces
        are collapsed. The result stays within :data:`MAX_PROMPT_CHARS` by dropping additions: quality words first,
        then style phrases, then trigger words. The user's prompt is never cut, so a prompt longer than the cap alone
        comes back as it is.

        With a template (see :func:`check_template`): its fields are filled with the prompt, the style and the
        comma-joined trigger words. A filled template over the cap falls back to the prompt with its trigger words
        and style, as without one.

        Args:
            prompt: The user's prompt.
            style: The model's style, comma-separated phrases ("watercolor, soft pastel colours").
            trigger_words: Words the model's LoRA was trained to respond to; the output contains each.
            template: A per-model template, or "" for none.

        Returns:
            The enhanced prompt, method "template".

        Raises:
            ValueError: The prompt is empty or blank, or the template is not valid.
        """
        original = _prompt(prompt)
        if template:
            check_template(template)
            filled = _clean(
                template.format(prompt=original, style=_clean(style), trigger=", ".join(_phrases(trigger_words)))
            )
            if len(filled) <= MAX_PROMPT_CHARS:
                return Enhanced(original, filled, "template")
            return Enhanced(original, self._build(original, style, trigger_words, quality=()), "template")
        return Enhanced(original, self._build(original, style, trigger_words, quality=QUALITY_WORDS), "template")

    async def close(self) -> None:
        """Nothing to release; here so callers treat both enhancers alike."""

    @staticmethod
    def _build(prompt: str, style: str, trigger_words: Sequence[str], quality: Sequence[str]) -> str:
        body = _clean(prompt)
        triggers = _missing(body, _phrases(trigger_words))
        styles = _missing(", ".join([*triggers, body]), _phrases(style.split(",")))
        extras = _missing(", ".join([*triggers, body, *styles]), quality)
        before = len(triggers)  # additions below this index go in front of the prompt
        additions = [*triggers, *styles, *extras]

        def render(keep: set[int]) -> str:
            chosen = [i for i in range(len(additions)) if i in keep]
            return ", ".join(
                [*(additions[i] for i in chosen if i < before), body, *(additions[i] for i in chosen if i >= before)]
            )

        # Greedy by priority, which is the order of `additions`: a trigger word matters more than a style phrase,
        # which matters more than a quality word. A long addition that does not fit leaves room for shorter ones.
        keep: set[int] = set()
        for i in range(len(additions)):
            if len(render(keep | {i})) <= MAX_PROMPT_CHARS:
                keep.add(i)
        return render(keep)


class ChatEnhancer:
    """Enhancement by an OpenAI-compatible chat completions upstream.

    Args:
        base_url: The upstream's API root, ``/v1`` included ("http://host:8000/v1").
        model: The chat model to ask.
        api_key: Sent as ``Authorization: Bearer <key>`` when set.
        timeout: Seconds one request may take, connecting included.
        system_prompt: The instructions; the style and trigger-word lines are added per request.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str = "",
        timeout: float = 30.0,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key
        self.timeout = timeout
        self.system_prompt = system_prompt
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def system_message(self, style: str = "", trigger_words: Sequence[str] = ()) -> str:
        """The system prompt for one request: the instructions, then the model's style and trigger words."""
        lines = [self.system_prompt.strip()]
        if style := _clean(style):
            lines.append(f"Write the prompt in this style: {style}.")
        if triggers := _phrases(trigger_words):
            lines.append(
                "These trigger words must appear in the prompt exactly as written, keep them: " + ", ".join(triggers)
            )
        return "\n".join(lines)

    async def enhance(
        self, prompt: str, *, style: str = "", trigger_words: Sequence[str] = (), template: str = ""
    ) -> Enhanced:
        """Ask the upstream to rewrite ``prompt``.

        The answer is stripped of surrounding quotes and whitespace; a template, when given, is filled with it as
        ``{prompt}``; any trigger word the result lacks is put in front.

        Args:
            prompt: The user's prompt.
            style: The model's style, for the system prompt.
            trigger_words: Words the result must contain.
            template: A per-model template (see :func:`check_template`), or "" for none.

        Returns:
            The enhanced prompt, method "llm".

        Raises:
            ValueError: The prompt is empty or blank, or the template is not valid.
            UpstreamFailed: The upstream is unreachable, times out, answers other than 2xx, or answers without a
                chat completion's non-empty ``choices[0].message.content``.
        """
        original = _prompt(prompt)
        if template:
            check_template(template)  # before paying for the upstream call
        body = {
            "model": self.model,
            "messages": [
                {"role": "system", "content": self.system_message(style, trigger_words)},
                {"role": "user", "content": original},
            ],
            "temperature": 0.7,
            "max_tokens": 300,
        }
        answer = _clean(self._content(await self._post(body)).strip().strip(_QUOTES).strip())
        if not answer:
            raise UpstreamFailed(f"prompt enhancer {self.url} answered an empty prompt")
        if template:
            answer = _clean(
                template.format(prompt=answer, style=_clean(style), trigger=", ".join(_phrases(trigger_words)))
            )
        return Enhanced(original, _with_triggers(answer, trigger_words), "llm")

    async def close(self) -> None:
        """Close the connection pool; a later :meth:`enhance` opens a new one."""
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def _client(self) -> aiohttp.ClientSession:
        # Made on first use, not in __init__: a ClientSession belongs to the running event loop.
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self._session

    async def _post(self, body: dict[str, Any]) -> Any:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            async with self._client().post(self.url, json=body, headers=headers) as response:
                text = await response.text(errors="replace")
                status = response.status
        except TimeoutError:
            raise UpstreamFailed(f"prompt enhancer {self.url} did not answer within {self.timeout:g} s") from None
        except aiohttp.ClientError as e:
            raise UpstreamFailed(f"prompt enhancer {self.url} is unreachable: {e}") from None
        if not 200 <= status < 300:
            raise UpstreamFailed(f"prompt enhancer {self.url} answered HTTP {status}: {text[:200].strip()}")
        try:
            return json.loads(text)
        except ValueError:
            raise UpstreamFailed(f"prompt enhancer {self.url} answered malformed JSON: {text[:200].strip()}") from None

    def _content(self, data: Any) -> str:
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise UpstreamFailed(f"prompt enhancer {self.url} answered no choices[0].message.content") from None
        if not isinstance(content, str):
            raise UpstreamFailed(f"prompt enhancer {self.url} answered a non-text message content")
        return content
