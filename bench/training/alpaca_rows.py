"""Alpaca-format rows made up deterministically, shaped like alpaca-gpt4-data-zh/-en (the device has no network).

Lengths, in Qwen2.5 tokens (the text is chosen so that one unit is about one token: a common Chinese character,
or a common English word after a space): instruction uniform 20-60; an ``input`` on 30% of the rows, uniform
10-60; output log-normal with median 250 and sigma 0.7, clipped to [8, 1800] (alpaca-gpt4's answers average
about 250 tokens, with a long tail). zh rows are Chinese characters with Chinese punctuation, en rows English
words in sentences, so the real tokenizer sees realistic text (the exact token counts come from the job).
"""

from __future__ import annotations

import json
import math
import random

# Common characters (each one token in Qwen2.5's vocabulary in most contexts).
ZH_CHARS = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后"
    "多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合"
    "还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只"
    "没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边"
    "流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处队南给色光门即保治北造"
    "百规热领七海口东导器压志世金增争济阶油思术极交受联什认六共权收证改清美再采转更单风切打白教速花带安场身车例真"
    "务具万每目至达走积示议声报斗完类八离华名确才科张信马节话米整空元况今集温传土许步群广石记需段研界拉林律叫且究"
)
ZH_PUNCT = "，，，。。、；："
EN_TEXT = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they you "
    "were her she there been one all we their has would when if so no will can more other its about what some up "
    "time out into only could new them these than may first like then any now most also made after many over such "
    "where must before through back years much your way well down should because each just those how too people "
    "world life good very work great long little between state system during number part place public however "
    "without under water again never school important another business information government development family "
    "example different power small large local national social general possible water energy health history "
    "language answer question process result method design student teacher market product customer science data "
    "model simple clear point reason change problem support value create provide include describe explain write "
    "list write story poem summary article company service country city river food money music light plant animal"
)
EN_WORDS = list(dict.fromkeys(EN_TEXT.split()))


def _zh_text(rng: random.Random, tokens: int) -> str:
    out: list[str] = []
    since = 0
    for _ in range(tokens):
        if since > 6 and rng.random() < 0.12:
            out.append(rng.choice(ZH_PUNCT))
            since = 0
        else:
            out.append(rng.choice(ZH_CHARS))
            since += 1
    return "".join(out).rstrip("，、；：") + "。"


def _en_text(rng: random.Random, tokens: int) -> str:
    sentences: list[str] = []
    left = tokens
    while left > 0:
        n = min(left, rng.randint(6, 24))
        words = [rng.choice(EN_WORDS) for _ in range(n)]
        sentences.append(" ".join(words).capitalize() + ".")
        left -= n + 1  # the full stop is a token of its own
    return " ".join(sentences)


def alpaca_rows(language: str, count: int, seed: int, scale: float = 1.0) -> list[dict[str, str]]:
    """``count`` rows {"instruction", "input", "output"} in ``language`` ('zh' or 'en'); ``scale`` shortens every
    length (a CPU smoke run)."""
    text = {"zh": _zh_text, "en": _en_text}[language]
    rng = random.Random(f"{language}-{seed}")

    def length(n: float) -> int:
        return max(2, round(n * scale))

    rows = []
    for _ in range(count):
        instruction = text(rng, length(rng.randint(20, 60)))
        extra = text(rng, length(rng.randint(10, 60))) if rng.random() < 0.3 else ""
        output = length(min(1800, max(8, rng.lognormvariate(math.log(250), 0.7))))
        rows.append({"instruction": instruction, "input": extra, "output": text(rng, output)})
    return rows


def jsonl(rows: list[dict[str, str]]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()
