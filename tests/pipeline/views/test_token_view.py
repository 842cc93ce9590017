from __future__ import annotations

from pipeline.views.token_view import STYLES, keep_view


def test_each_token_gets_the_style_of_its_flags(tokenizer):
    ids = tokenizer("Hi there friend", add_special_tokens=False)["input_ids"][:3]
    text = keep_view(tokenizer, ids, [False, True, True], [False, True, False])
    styles = [str(span.style) for span in text.spans]
    assert styles == [STYLES["context"], STYLES["kept"], STYLES["dropped"]]
    assert text.plain == tokenizer.decode(ids)
