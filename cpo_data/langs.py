"""Language codes the toolkit knows: English names for ALMA's prompt, NLLB and M2M100 codes.

Codes are ISO 639-1 where one exists (the codes ALMA-R and WMT use). An unknown code is an
error, not a guess: a typo here would silently produce a prompt in the wrong language.
"""

from __future__ import annotations

from dataclasses import dataclass

from cpo_data.errors import UserError


@dataclass(frozen=True)
class Language:
    code: str
    """ISO 639-1 code (or 639-3 where there is no two-letter code)."""
    name: str
    """English name, as ALMA's prompt writes it."""
    nllb: str
    """NLLB-200 / FLORES-200 code, e.g. deu_Latn."""
    m2m: str | None
    """M2M100 language token without underscores, or None when M2M100 lacks it."""


_TABLE = [
    ("ar", "Arabic", "arb_Arab", "ar"),
    ("bg", "Bulgarian", "bul_Cyrl", "bg"),
    ("bn", "Bengali", "ben_Beng", "bn"),
    ("ca", "Catalan", "cat_Latn", "ca"),
    ("cs", "Czech", "ces_Latn", "cs"),
    ("da", "Danish", "dan_Latn", "da"),
    ("de", "German", "deu_Latn", "de"),
    ("el", "Greek", "ell_Grek", "el"),
    ("en", "English", "eng_Latn", "en"),
    ("es", "Spanish", "spa_Latn", "es"),
    ("et", "Estonian", "est_Latn", "et"),
    ("fa", "Persian", "pes_Arab", "fa"),
    ("fi", "Finnish", "fin_Latn", "fi"),
    ("fr", "French", "fra_Latn", "fr"),
    ("gu", "Gujarati", "guj_Gujr", "gu"),
    ("ha", "Hausa", "hau_Latn", "ha"),
    ("he", "Hebrew", "heb_Hebr", "he"),
    ("hi", "Hindi", "hin_Deva", "hi"),
    ("hr", "Croatian", "hrv_Latn", "hr"),
    ("hu", "Hungarian", "hun_Latn", "hu"),
    ("id", "Indonesian", "ind_Latn", "id"),
    ("is", "Icelandic", "isl_Latn", "is"),
    ("it", "Italian", "ita_Latn", "it"),
    ("ja", "Japanese", "jpn_Jpan", "ja"),
    ("kk", "Kazakh", "kaz_Cyrl", "kk"),
    ("ko", "Korean", "kor_Hang", "ko"),
    ("lt", "Lithuanian", "lit_Latn", "lt"),
    ("lv", "Latvian", "lvs_Latn", "lv"),
    ("nl", "Dutch", "nld_Latn", "nl"),
    ("no", "Norwegian", "nob_Latn", "no"),
    ("pl", "Polish", "pol_Latn", "pl"),
    ("ps", "Pashto", "pbt_Arab", "ps"),
    ("pt", "Portuguese", "por_Latn", "pt"),
    ("ro", "Romanian", "ron_Latn", "ro"),
    ("ru", "Russian", "rus_Cyrl", "ru"),
    ("sk", "Slovak", "slk_Latn", "sk"),
    ("sl", "Slovenian", "slv_Latn", "sl"),
    ("sr", "Serbian", "srp_Cyrl", "sr"),
    ("sv", "Swedish", "swe_Latn", "sv"),
    ("sw", "Swahili", "swh_Latn", "sw"),
    ("ta", "Tamil", "tam_Taml", "ta"),
    ("th", "Thai", "tha_Thai", "th"),
    ("tr", "Turkish", "tur_Latn", "tr"),
    ("uk", "Ukrainian", "ukr_Cyrl", "uk"),
    ("ur", "Urdu", "urd_Arab", "ur"),
    ("vi", "Vietnamese", "vie_Latn", "vi"),
    ("xh", "Xhosa", "xho_Latn", "xh"),
    ("zh", "Chinese", "zho_Hans", "zh"),
]

LANGUAGES: dict[str, Language] = {code: Language(code, *rest) for code, *rest in _TABLE}


class UnknownLanguageError(UserError):
    """A language code that is not in the table."""


def normalize_code(code: str) -> str:
    """Lower-case and strip a code; 'DE' and ' de' mean 'de'."""
    return code.strip().lower()


def get_language(code: str) -> Language:
    """The language for `code`, or UnknownLanguageError listing what is known."""
    key = normalize_code(code)
    if key not in LANGUAGES:
        known = ", ".join(sorted(LANGUAGES))
        raise UnknownLanguageError(f"unknown language code {code!r} (known: {known})")
    return LANGUAGES[key]


def language_name(code: str) -> str:
    """English name for the prompt: 'de' -> 'German'."""
    return get_language(code).name


def lang_pair(src_lang: str, tgt_lang: str) -> str:
    """The direction as the tables write it: 'de-en'."""
    return f"{normalize_code(src_lang)}-{normalize_code(tgt_lang)}"
