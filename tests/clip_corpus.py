"""A radiology-report style corpus for the tokenizer parity tests: findings generated from templates (as in
chest X-ray reports, with IU X-ray's XXXX anonymisation), hand-written edge cases, and over-long reports.

DISAGREE lists the sentences on which OpenAI's reference tokenizer (ftfy + HTML unescaping + str.lower) and
transformers' CLIPTokenizer (NFC + per-character lowercase) give different ids; everything else in the corpus
must give the same ids in both.
"""
import random

ORGANS = ["heart", "lungs", "mediastinum", "cardiomediastinal silhouette", "pulmonary vasculature",
          "osseous structures", "right hemidiaphragm", "left costophrenic angle", "trachea", "aortic arch"]
STATES = ["within normal limits", "normal in size", "clear", "unremarkable", "stable", "mildly enlarged",
          "hyperexpanded", "grossly normal", "not well visualized", "partially obscured by XXXX"]
FINDINGS = ["pneumothorax", "pleural effusion", "focal consolidation", "pulmonary edema", "cardiomegaly",
            "acute bony abnormality", "airspace disease", "hilar adenopathy", "free subdiaphragmatic air",
            "displaced rib fracture"]
SIZES = ["3 mm", "4.5 mm", "12mm", "1.2 cm", "2.0cm", "7 x 5 mm", "15 x 12 x 9 mm", "0.8 cm"]
LEVELS = ["T12-L1", "T4", "L5-S1", "C6-C7", "T8 through T10", "L2/L3"]
SIDES = ["right", "left", "bilateral", "Right", "LEFT"]
TEMPLATES = [
    "The {organ} is {state}.",
    "No {finding}.",
    "No evidence of {finding} or {finding2}.",
    "There is a {size} nodule in the {side} upper lobe.",
    "Degenerative changes of the spine at {level}.",
    "{Organ} {state}. No {finding}.",
    "Mild {finding} at the {side} base, XXXX atelectasis.",
    "Compression deformity of {level}, unchanged since XXXX.",
    "Stable {size} calcified granuloma, {side} lower lobe.",
    "Findings: {organ} {state}; no {finding}. Impression: no acute cardiopulmonary disease.",
    "Comparison: XXXX, XXXX. {Organ} is {state}.",
    "Interval increase in {finding} ({size} -> {size2}).",
]

EDGE_CASES = [
    "XXXX.", "XXXX-XXXX XXXX", "xxxx, XXXX; Xxxx", "T12-L1", "t12-l1 disc space narrowing", "4k,", "4k, highly-detailed",
    "highly-detailed photograph of a chest x-ray", "A highly-detailed, 8K render.", "Heart size 14.5cm (upper normal).",
    "SpO2 98%, HR 72 bpm, BP 120/80 mmHg", "1/2 of the lung; 3:1 ratio; 10^3 cells/uL", "2.5x10^4 mL/kg/min",
    "pH 7.40 +/- 0.05", "temp 38.2 C, CRP > 10 mg/L", "Dose: 5 mSv @ 120 kVp", "Grade II/IV, 50-60%",
    "no acute process...", "?? effusion !!", "\"clear\" lungs", "(no change) [stable] {unchanged}", "#1: ok; #2: n/a",
    "it's stable; they'll follow up; we'd recommend CT; you're fine; I'm done; they've seen it; don't.",
    "IT'S STABLE, DON'T WORRY", "patient's right lung", "rock'n'roll 'quoted'", "O'Neill's sign",
    "ID 0123456789", "3.14159265358979", "100000 units", "1,000,000 cells", "v2.0.1-beta", "e-mail: xxxx@xxxx.com",
    "https://example.org/report?id=XXXX&type=cxr", "C:\\scans\\xray_001.png", "tab\tseparated\tfields",
    "line one\nline two\r\nline three", "  leading and trailing spaces   ", "multiple     inner      spaces",
    "", " ", "a", "A", ".", "...", "12", "x-ray", "X-RAY",
    # Non-ASCII text that both references treat alike.
    "Größe 5 µm, Durchmesser 3 mm", "naïve café résumé", "épanchement pleural à droite", "Lunge: o.B., Herz: normal",
    "temperature 38 °C ± 0.5", "nodule 5×4 mm", "ratio ≤ 0.5 ≥ 0.2", "→ see prior", "β-blocker, α-1",
    "肺野清晰, 心影不大", "胸部X線: 異常なし", "Легкие без очаговых изменений", "الرئتين سليمة", "폐 정상",
    "emoji 🙂 test 🫁", "½ of ¾", "Ⅻ roman numeral", "x²+y³", "İstanbul", "straße STRASSE",
    "combining e\u0301 accent", "zero\u200bwidth space", "non\u00a0breaking space", "ideographic\u3000space",
    "en\u2002space and thin\u2009space",
]

# Where the two references differ, and why. Ours follows transformers on these.
DISAGREE = [
    "&amp; &lt;5 mm&gt;",               # OpenAI unescapes HTML entities, transformers does not
    "left &gt; right, 5&nbsp;mm",       # the same, with &nbsp; becoming a space in OpenAI's
    "it’s the patient’s film",           # ftfy straightens curly quotes, so OpenAI then sees the contraction 's
    "“clear” lungs",                    # ftfy straightens curly double quotes
    "ﬁndings: ﬂuid",                     # ftfy expands ligatures
    "ＸＸＸＸ ｃｔ １２",                  # ftfy makes full-width characters normal width
    "cafÃ© mojibake",                    # ftfy repairs UTF-8 read as Latin-1
    "ǅ titlecase digraph",               # ftfy splits the digraph into two letters
    "ΟΔΟΣ ΑΟΡΤΗΣ",                       # str.lower() gives a final sigma, per-character lowercasing does not
    "record\x1cseparator",               # ftfy drops control characters; transformers keeps U+001C as punctuation
    "next\x85line",                      # ftfy turns U+0085 into an ellipsis; transformers treats it as whitespace
    "<|ENDOFTEXT|> upper-case special",  # OpenAI lowercases, then reads the special token; transformers reads text
    "finding.<|endoftext|>tail",         # transformers takes the special token out first; OpenAI splits ".<|"
]


def generated(n: int = 220, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        organ, finding, finding2 = rng.choice(ORGANS), *rng.sample(FINDINGS, 2)
        out.append(rng.choice(TEMPLATES).format(
            organ=organ, Organ=organ.capitalize(), state=rng.choice(STATES), finding=finding, finding2=finding2,
            size=rng.choice(SIZES), size2=rng.choice(SIZES), side=rng.choice(SIDES), level=rng.choice(LEVELS)))
    return out


def long_reports(n: int = 12, seed: int = 1) -> list[str]:
    """Whole reports of 8 to 20 findings, most of them far over the 75 text tokens that fit in 77."""
    rng = random.Random(seed)
    pool = generated(100, seed=seed)
    return [" ".join(rng.sample(pool, rng.randint(8, 20))) for _ in range(n)]


def corpus() -> list[str]:
    """Sentences on which both references agree."""
    return generated() + EDGE_CASES + long_reports()
