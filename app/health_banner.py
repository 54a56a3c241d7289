"""The Run page's banner of d-health warnings (trainers/health.py): each code once, newest first, in words.

Other warnings (skipped images, dataset and config notes) stay in the run's status notices.
"""

from __future__ import annotations

import html
from typing import Any

from trainers.health import CODES

Event = dict[str, Any]

HEADLINES = {
    "lr_not_one": "The learning rate multiplies d",
    "d_stuck": "d has not grown from d0",
    "d_growing_late": "d is still growing near the end of the run",
    "text_encoder_d_high": "The text encoder steps far larger than the model",
    "overfitting": "Overfitting: the validation loss is rising",
    "nonfinite_gradients": "Steps skipped for NaN/inf gradients",
    "weight_decay_lora": "Weight decay is shrinking the LoRA",
}
STYLE = (
    "border-left:4px solid #d97706;background:rgba(217,119,6,0.10);padding:0.5em 0.8em;"
    "margin:0.3em 0;border-radius:4px"
)


def health_warnings(events: list[Event]) -> list[Event]:
    """The newest warning event of each d-health code, newest first."""
    newest: dict[str, tuple[int, Event]] = {}
    for index, event in enumerate(events):
        if event.get("type") == "warning" and event.get("code") in CODES:
            newest[event["code"]] = (index, event)
    return [event for _, event in sorted(newest.values(), key=lambda item: item[0], reverse=True)]


def headline(code: str) -> str:
    """A warning code in words (a code this UI does not know yet gets its name spelled out)."""
    return HEADLINES.get(code) or code.replace("_", " ").capitalize()


def banner_html(events: list[Event]) -> str:
    """The banner as HTML, "" when the run has no d-health warning."""
    items = []
    for event in health_warnings(events):
        step = event.get("step")
        at = f" (step {step})" if isinstance(step, int) else ""
        items.append(
            f'<div class="ppsf-health-warning" data-code="{html.escape(str(event["code"]))}" style="{STYLE}">'
            f"<strong>⚠ {html.escape(headline(event['code']))}</strong>{at}: "
            f"{html.escape(str(event.get('message', '')))}</div>"
        )
    return "".join(items)


def is_banner_warning(event: Event) -> bool:
    """Whether the banner shows this event (so the status notices need not repeat it)."""
    return event.get("type") == "warning" and event.get("code") in CODES


def banner_markdown(events: list[Event]) -> str:
    """The same warnings as Markdown lines (for pages that show a run's summary), "" when none."""
    lines = []
    for event in health_warnings(events):
        step = event.get("step")
        at = f" (step {step})" if isinstance(step, int) else ""
        lines.append(f"- ⚠ **{headline(event['code'])}**{at}: {event.get('message', '')}")
    return "\n".join(lines)
