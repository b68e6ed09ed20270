"""Hypothesis strategies for hostile input, shared by tests/test_hostile.py and tests/test_attack_inputs.py."""

from __future__ import annotations

from hypothesis import strategies as st

# Text that is valid YAML when dumped: no surrogates (PyYAML cannot encode them).
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=30)
TEMPLATE_TEXT = st.sampled_from(
    [
        "{{ 7 * 7 }}",
        "{% raw %}",
        "{{ config }}",
        "{{ ''.__class__.__mro__ }}",
        "{#",
        "${HOME}",
        "$(id)",
        "%s%n",
        "{0}",
        "{}",
        "'; DROP",
        "\x00",
        "\u202e",
        "名前",
        "🦙",
        "\r\n",
        "../../etc/passwd",
    ]  # fmt: skip
)
HOSTILE_TEXT = st.one_of(TEXT, TEMPLATE_TEXT, st.builds(lambda a, b: a + b, TEMPLATE_TEXT, TEXT))
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), HOSTILE_TEXT)
JSONISH = st.recursive(
    SCALARS, lambda kids: st.one_of(st.lists(kids, max_size=3), st.dictionaries(TEXT, kids, max_size=3)), max_leaves=8
)
