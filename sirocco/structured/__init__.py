"""Grammar-constrained decoding: JSON objects, JSON schemas and forced tool calls.

Build a factory per request, then give each sequence its own processor::

    factory = json_schema(schema, strict=True, tokenizer=tokenizer)  # InvalidSchema -> 400
    params.logits_processors = [factory()]                            # one per sequence
"""

from sirocco.structured.constraints import (
    ConstraintFactory,
    GrammarConstraint,
    GrammarConstraintFactory,
    TokenBan,
    forbid_tokens,
    json_object,
    json_schema,
    no_tool_calls,
    tool_call,
    tool_call_token_ids,
)
from sirocco.structured.grammar import InvalidSchema
from sirocco.structured.vocabulary import GrammarVocabulary, grammar_vocabulary

__all__ = [
    "ConstraintFactory",
    "GrammarConstraint",
    "GrammarConstraintFactory",
    "GrammarVocabulary",
    "InvalidSchema",
    "TokenBan",
    "forbid_tokens",
    "grammar_vocabulary",
    "json_object",
    "json_schema",
    "no_tool_calls",
    "tool_call",
    "tool_call_token_ids",
]
