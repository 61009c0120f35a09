"""Alarming words: the regex that finds benign instructions which merely sound alarming.

Alpaca has about 440 instructions of that kind ("a plan of attack for a chess game", "the history of the death
penalty", "what a zero-day attack is"), each with a compliant, harmless answer. The harmless judge fits on them
as benign compliance (``judges.harmless``), and the harmless expert may train on them
(``data.harmless_benign_examples``), so that neither reads a scary-sounding request as a harmful one.
"""

from __future__ import annotations

import re

ALARMING = re.compile(
    r"\b(?:kill\w*|murder\w*|attack\w*|weapon\w*|guns?|shoot\w*|shot|bomb\w*|explosi\w*|poison\w*|drugs?|"
    r"steal\w*|stole\w*|theft|thie\w*|hack\w*|exploit\w*|virus\w*|malware|terror\w*|assault\w*|violen\w*|"
    r"blood\w*|death\w*|dead\w*|die|dies|died|dying|suicid\w*|abus\w*|fraud\w*|scam\w*|crim\w*|illegal\w*|"
    r"war|wars|warfare|fight\w*|destroy\w*|threat\w*|danger\w*|harm\w*|hate\w*|hatred|racis\w*|tortur\w*|"
    r"kidnap\w*|knife|knives|execut\w*|zero-day|phishing|smuggl\w*|cheat\w*|stab\w*|slaughter\w*|massacre\w*|"
    r"genocide|nuclear|toxic\w*|cocaine|heroin|overdos\w*|arson|burglar\w*|robber\w*|riot\w*|extremis\w*|"
    r"slaver\w*|victim\w*|hostage\w*|sniper\w*|missile\w*|abort\w*|hijack\w*|sabotag\w*|spy|spies|spying|"
    r"surveillance|manipulat\w*|revenge|enem\w*|destruct\w*|battle\w*|invade\w*|invasion)\b",
    re.IGNORECASE)
"""Words of violence, crime, harm and danger (case-insensitive, whole words and their inflections)."""


def is_alarming(text: str) -> bool:
    """True when ``text`` uses an alarming word."""
    return ALARMING.search(text) is not None
