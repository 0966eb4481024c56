"""The fixed texts on which each engine's tokenizer must give Ryzen's ids, chosen for the cases
byte-level BPE ports get wrong: pre-tokenizer splits (contractions, digits, punctuation runs,
whitespace runs), bytes outside ASCII, and the end-of-text marker written inside a text."""

IDENTITY_TEXTS = (
    "def forward(self, x):\n    return self.proj(x) + 1\n",
    "It's what they'd've done; we'll see, I'm sure.",
    "Numbers: 3.14159, 2026-11-28, 1,000,000 and 0x7f.",
    "   leading spaces,\ttabs\t\tand  double  spaces   \n\n\ntrailing   ",
    "Ünïcödé: naïve café, Straße, Ελληνικά, русский, 日本語の文章, 한국어.",
    "Emoji 🙂🚀 and symbols ≤ ≥ → ∑ © ™ — “quotes” ‘single’…",
    "a<|endoftext|>b is text here, not a boundary",
    "!!!??? ... --- ___ *** ### @@@ $$$ %%% ^^^ &&& ((( ))) [[[ ]]] {{{ }}}",
    "",
    " ",
)
