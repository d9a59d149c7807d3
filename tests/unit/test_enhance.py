"""Prompt enhancers: the deterministic template one, and the chat one against a local OpenAI-compatible server."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from app.services.enhance import (
    DEFAULT_SYSTEM_PROMPT,
    MAX_PROMPT_CHARS,
    QUALITY_WORDS,
    ChatEnhancer,
    Enhanced,
    TemplateEnhancer,
    UpstreamFailed,
    check_template,
)

# -- TemplateEnhancer -------------------------------------------------------------------------------------------------


async def test_template_adds_quality_words() -> None:
    result = await TemplateEnhancer().enhance("  a red fox in the snow  ")
    assert result == Enhanced(
        "a red fox in the snow",
        "a red fox in the snow, highly detailed, sharp focus, professional lighting",
        "template",
    )


async def test_trigger_word_added_once_in_front() -> None:
    result = await TemplateEnhancer().enhance("a dog on a beach", trigger_words=["sks dog", "sks dog"])
    assert result.enhanced.startswith("sks dog, a dog on a beach, ")
    assert result.enhanced.lower().count("sks dog") == 1


@pytest.mark.parametrize("prompt", ["a photo of SKS on a beach", "Sks, on a beach", "on a beach with sks."])
async def test_trigger_word_present_in_any_case_is_not_repeated(prompt: str) -> None:
    result = await TemplateEnhancer().enhance(prompt, trigger_words=["sks"])
    assert result.enhanced.lower().count("sks") == 1
    assert result.enhanced.startswith(prompt.rstrip("."))


async def test_trigger_word_matches_whole_words_only() -> None:
    # "tok" inside "token" is not the trigger word.
    result = await TemplateEnhancer().enhance("a token on a table", trigger_words=["tok"])
    assert result.enhanced.startswith("tok, a token on a table")


async def test_style_appended_unless_present() -> None:
    enhancer = TemplateEnhancer()
    result = await enhancer.enhance("a castle", style="watercolor, soft pastel colours")
    assert result.enhanced == (
        "a castle, watercolor, soft pastel colours, highly detailed, sharp focus, professional lighting"
    )
    result = await enhancer.enhance("a Watercolor castle", style="watercolor, , soft pastel colours")
    assert result.enhanced.lower().count("watercolor") == 1
    assert "soft pastel colours" in result.enhanced


async def test_quality_words_not_repeated() -> None:
    result = await TemplateEnhancer().enhance("a highly detailed fox, Sharp Focus", style="professional lighting")
    for word in QUALITY_WORDS:
        assert result.enhanced.lower().count(word) == 1, word


async def test_commas_and_whitespace_collapse() -> None:
    result = await TemplateEnhancer().enhance("a fox ,,  in   the\n snow , ,", trigger_words=[" tok "])
    assert result.enhanced == "tok, a fox, in the snow, highly detailed, sharp focus, professional lighting"


async def test_custom_template_fills_placeholders() -> None:
    result = await TemplateEnhancer().enhance(
        "a fox",
        style="ukiyo-e",
        trigger_words=["tok", "ohwx"],
        template="{trigger} style, {prompt}, in the style of {style}, {{masterpiece}}",
    )
    assert result == Enhanced("a fox", "tok, ohwx style, a fox, in the style of ukiyo-e, {masterpiece}", "template")


async def test_custom_template_without_style_or_triggers_collapses_commas() -> None:
    result = await TemplateEnhancer().enhance("a fox", template="{trigger}, {prompt}, {style}, 8k")
    assert result.enhanced == "a fox, 8k"


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{prompt} {negative}", "unknown placeholder"),
        ("{style} only", "lacks"),
        ("{} {prompt}", "unknown placeholder"),
        ("{prompt.__class__}", "unknown placeholder"),
        ("{prompt!r}", "conversion"),
        ("{prompt:>40}", "format spec"),
        ("{prompt", "does not parse"),
        ("{prompt}}", "does not parse"),
    ],
)
async def test_bad_template_rejected(template: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_template(template)
    with pytest.raises(ValueError, match=message):
        await TemplateEnhancer().enhance("a fox", template=template)


def test_good_templates_pass() -> None:
    check_template("{prompt}")
    check_template("{trigger}, {prompt}, {style}, {{literal}}")


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
async def test_empty_prompt(prompt: str) -> None:
    with pytest.raises(ValueError, match="prompt is empty"):
        await TemplateEnhancer().enhance(prompt, trigger_words=["tok"])


async def test_length_cap_trims_additions_never_the_prompt() -> None:
    prompt = "a fox " * 160 + "at dusk"  # 967 characters: room for the trigger word and style, not for quality
    result = await TemplateEnhancer().enhance(prompt, style="oil painting, impasto", trigger_words=["tok"])
    assert len(result.enhanced) == 995 <= MAX_PROMPT_CHARS
    assert result.enhanced == "tok, " + prompt + ", oil painting, impasto"


async def test_length_cap_drops_style_before_trigger_words() -> None:
    prompt = "b" * 990
    result = await TemplateEnhancer().enhance(prompt, style="oil painting", trigger_words=["tok"])
    assert result.enhanced == "tok, " + prompt


async def test_length_cap_keeps_short_additions_that_fit() -> None:
    prompt = "x" * (MAX_PROMPT_CHARS - len(", sharp focus"))
    result = await TemplateEnhancer().enhance(prompt)
    assert result.enhanced == prompt + ", sharp focus"


async def test_prompt_over_the_cap_comes_back_whole() -> None:
    prompt = "y" * (MAX_PROMPT_CHARS + 50)
    result = await TemplateEnhancer().enhance(prompt, style="noir", trigger_words=["tok"])
    assert result.enhanced == prompt


async def test_overlong_filled_template_falls_back() -> None:
    prompt = "z" * 980
    result = await TemplateEnhancer().enhance(
        prompt, trigger_words=["tok"], template="{trigger}, {prompt}, " + "w" * 50
    )
    assert result.enhanced == "tok, " + prompt


async def test_close_is_harmless() -> None:
    enhancer = TemplateEnhancer()
    await enhancer.close()
    assert (await enhancer.enhance("a fox")).method == "template"


# -- ChatEnhancer -----------------------------------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Upstream:
    """A local chat completions server; ``reply`` decides each answer, ``seen`` keeps each request body."""

    base_url: str = ""
    reply: Handler | None = None
    seen: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)


def completion(content: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "tiny-chat",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
    }


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    state = Upstream()

    async def chat(request: web.Request) -> web.StreamResponse:
        state.headers.append(dict(request.headers))
        state.seen.append(await request.json())
        if state.reply is not None:
            return await state.reply(request)
        if request.headers.get("Authorization") != "Bearer sk-test":
            return web.json_response({"error": {"message": "bad key"}}, status=401)
        return web.json_response(completion('  "a red fox in deep snow, golden hour, tok"  '))

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    state.base_url = f"http://{host}:{port}/v1/"
    try:
        yield state
    finally:
        state.release.set()  # lets a handler that is holding its answer back finish, so cleanup does not wait on it
        await runner.cleanup()


@pytest.fixture
async def chat(upstream: Upstream) -> AsyncIterator[ChatEnhancer]:
    enhancer = ChatEnhancer(upstream.base_url, "tiny-chat", api_key="sk-test", timeout=5)
    try:
        yield enhancer
    finally:
        await enhancer.close()


async def test_chat_request_shape_and_answer(upstream: Upstream, chat: ChatEnhancer) -> None:
    assert chat.url == upstream.base_url.rstrip("/") + "/chat/completions"  # the fixture's trailing slash is gone
    result = await chat.enhance(" a red fox ", style="golden hour photo", trigger_words=["tok"])
    assert result == Enhanced("a red fox", "a red fox in deep snow, golden hour, tok", "llm")
    [body] = upstream.seen
    assert upstream.headers[0]["Authorization"] == "Bearer sk-test"
    assert body["model"] == "tiny-chat"
    assert body["temperature"] == 0.7
    assert body["max_tokens"] == 300
    system, user = body["messages"]
    assert system["role"] == "system" and user == {"role": "user", "content": "a red fox"}
    assert system["content"].startswith(DEFAULT_SYSTEM_PROMPT)
    assert "golden hour photo" in system["content"]
    assert "tok" in system["content"] and "trigger words" in system["content"]


async def test_chat_without_key_sends_no_authorization(upstream: Upstream) -> None:
    enhancer = ChatEnhancer(upstream.base_url, "tiny-chat")
    try:
        with pytest.raises(UpstreamFailed, match="HTTP 401"):
            await enhancer.enhance("a fox")
    finally:
        await enhancer.close()
    assert "Authorization" not in upstream.headers[0]


async def test_chat_custom_system_prompt_without_style(upstream: Upstream) -> None:
    enhancer = ChatEnhancer(upstream.base_url, "tiny-chat", api_key="sk-test", system_prompt="Rewrite. ")
    try:
        await enhancer.enhance("a fox")
    finally:
        await enhancer.close()
    assert upstream.seen[0]["messages"][0]["content"] == "Rewrite."


async def test_chat_missing_trigger_word_prepended(upstream: Upstream, chat: ChatEnhancer) -> None:
    async def reply(request: web.Request) -> web.Response:
        return web.json_response(completion("“A fox curled up in fresh snow, soft morning light.”\n"))

    upstream.reply = reply
    result = await chat.enhance("a fox", trigger_words=["ohwx", "TOK"])
    assert result.enhanced == "ohwx, TOK, A fox curled up in fresh snow, soft morning light."


async def test_chat_template_applies_to_the_answer(upstream: Upstream, chat: ChatEnhancer) -> None:
    result = await chat.enhance("a fox", trigger_words=["tok"], template="{prompt}, {{8k}}")
    assert result.enhanced == "a red fox in deep snow, golden hour, tok, {8k}"


async def test_chat_bad_template_fails_before_calling(upstream: Upstream, chat: ChatEnhancer) -> None:
    with pytest.raises(ValueError, match="unknown placeholder"):
        await chat.enhance("a fox", template="{prompt} {nope}")
    assert upstream.seen == []


async def test_chat_empty_prompt(upstream: Upstream, chat: ChatEnhancer) -> None:
    with pytest.raises(ValueError, match="prompt is empty"):
        await chat.enhance("  ")
    assert upstream.seen == []


async def test_chat_upstream_500(upstream: Upstream, chat: ChatEnhancer) -> None:
    async def reply(request: web.Request) -> web.Response:
        return web.Response(status=500, text="model crashed")

    upstream.reply = reply
    with pytest.raises(UpstreamFailed, match=r"HTTP 500: model crashed"):
        await chat.enhance("a fox")


def _answer(body: str | bytes, content_type: str = "application/json") -> Handler:
    async def reply(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=content_type)

    return reply


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (_answer("{not json"), "malformed JSON"),
        (_answer("<html>busy</html>", "text/html"), "malformed JSON"),
        (_answer(json.dumps({"choices": []})), "no choices"),
        (_answer(json.dumps({"error": "nope"})), "no choices"),
        (_answer(json.dumps([1, 2])), "no choices"),
        (_answer(json.dumps(completion(None))), "non-text"),
        (_answer(json.dumps(completion('  ""  '))), "empty"),
    ],
)
async def test_chat_malformed_answers(upstream: Upstream, chat: ChatEnhancer, reply: Handler, message: str) -> None:
    upstream.reply = reply
    with pytest.raises(UpstreamFailed, match=message):
        await chat.enhance("a fox")


async def test_chat_timeout(upstream: Upstream) -> None:
    async def reply(request: web.Request) -> web.Response:
        await upstream.release.wait()
        return web.json_response(completion("too late"))

    upstream.reply = reply
    enhancer = ChatEnhancer(upstream.base_url, "tiny-chat", api_key="sk-test", timeout=0.2)
    try:
        with pytest.raises(UpstreamFailed, match=r"did not answer within 0\.2 s"):
            await enhancer.enhance("a fox")
    finally:
        await enhancer.close()


async def test_chat_unreachable_port() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago and that nothing listens on now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    enhancer = ChatEnhancer(f"http://127.0.0.1:{port}/v1", "tiny-chat", timeout=5)
    try:
        with pytest.raises(UpstreamFailed, match="unreachable"):
            await enhancer.enhance("a fox")
    finally:
        await enhancer.close()


async def test_chat_reopens_after_close(upstream: Upstream, chat: ChatEnhancer) -> None:
    await chat.enhance("a fox")
    await chat.close()
    await chat.close()  # twice is fine
    assert (await chat.enhance("a fox")).method == "llm"
    assert len(upstream.seen) == 2
