"""The support assistant: retrieval-grounded answers with citations, or a durable handover to a person.

Above the API (it loads the models a `support.yaml` names with `lmforge.load`), below the server
and the CLI, which both run it.
"""

from lmforge.support.assistant import Assistant, Source, SupportReply, extractive_answer, open_assistant
from lmforge.support.config import SupportConfig, read_support_config
from lmforge.support.handovers import Handover, HandoverQueue
from lmforge.support.policy import REASONS, Escalation, Policy

__all__ = ["REASONS", "Assistant", "Escalation", "Handover", "HandoverQueue", "Policy", "Source", "SupportConfig",
           "SupportReply", "extractive_answer", "open_assistant", "read_support_config"]
