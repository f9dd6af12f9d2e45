"""Task-type detection: OpenAI chat messages -> "chat" | "coding" | "analysis" | "creative".

Used by ``task_specific`` and ``balanced`` routing when the request names no
``task_type`` (docs/rules.md). It is a cheap heuristic, not a model: weighted
words, phrases and shapes of text (code fences, stack traces, camelCase, lists
of numbers...), all compiled once at import. Accuracy on the labelled prompts
in tests/data/task_prompts.jsonl is asserted in tests/core/test_tasks.py.

Invariants:
- Pure, synchronous, stdlib only; never raises on any input, whatever its
  shape, and always returns one of ``TASK_TYPES``.
- Bounded work per call: only the last ``MAX_MESSAGES_SCANNED`` messages and
  the first ``MAX_SYSTEM`` are looked at; of those, the last user message, up
  to ``MAX_EARLIER_USER`` earlier ones, the system prompts and the last
  assistant message are read, each cut to a fixed number of characters, so the
  cost does not grow with the conversation or with pasted documents.
- Each distinct feature (word, phrase or shape) counts once per text: pasting
  a long document repeats words without adding evidence.
- "chat" is the default: it starts with ``CHAT_PRIOR`` and wins ties, so a
  prompt with no clear evidence gets the general-purpose route.
- Tool definitions are not looked at and tool-role messages are ignored: a
  request that offers tools is not thereby a coding request.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import islice

from proxy.config.model import TASK_TYPES, TaskType

MAX_LAST_USER_CHARS = 4000
MAX_OTHER_CHARS = 1000
MAX_EARLIER_USER = 3
MAX_SYSTEM = 2
MAX_MESSAGES_SCANNED = 16  # from the end of the conversation
# The last user message carries the request; earlier turns and the system
# prompt give context; the assistant's own words only a hint.
WEIGHT_LAST_USER = 1.0
WEIGHT_EARLIER_USER = 0.35
WEIGHT_SYSTEM = 0.4
WEIGHT_ASSISTANT = 0.1
CHAT_PRIOR = 1.2
MIN_NUMBERS_FOR_DATA = 4
MIN_PLURAL_STEM = 4  # letters; plurals are generated only for longer listed words
SCORE_DECIMALS = 3  # in TaskGuess, for readable explain output
REQUEST_WINDOW = 6  # tokens after "write"/"what" in which the wanted thing is named

_SYSTEM_ROLES = frozenset({"system", "developer"})


def _weigh(weight: float, words: str) -> dict[str, float]:
    return dict.fromkeys(words.split(), weight)


def _words(words: str) -> frozenset[str]:
    return frozenset(words.split())


# --- words: one set intersection per text ----------------------------------------------------

_CODING_WORDS: dict[str, float] = {
    **_weigh(  # languages, runtimes, tools: rarely named outside programming
        2.0,
        "python javascript typescript java golang kotlin c++ c# haskell scala cobol fortran "
        "php perl powershell bash zsh html css sql nosql graphql node node.js nodejs deno "
        "react vue angular svelte jquery django flask fastapi express spring rails laravel "
        "pandas numpy pytorch tensorflow scipy matplotlib tkinter pytest jest junit mocha "
        "docker dockerfile kubernetes k8s kubectl helm terraform ansible nginx npm pnpm yarn "
        "pip conda cargo gradle maven webpack vite git github gitlab postgres postgresql "
        "mysql sqlite mongodb redis kafka elasticsearch regex regexp json yaml xml api apis "
        "sdk cli vim emacs vscode linux unix stackoverflow",
    ),
    **_weigh(1.4, "rust ruby swift lua dart elixir erlang clojure julia matlab"),
    **_weigh(  # things only code has
        1.6,
        "code coding codebase function functions script scripts program programming "
        "programmer compile compiler compiling debug debugging debugger refactor refactoring "
        "implement implementation traceback stacktrace segfault exception exceptions bug bugs "
        "buggy syntax variable variables array arrays pointer pointers struct enum boolean "
        "integer integers string strings null undefined nullptr tuple dict hashmap lambda "
        "callback callbacks async await asynchronous mutex deadlock recursion recursive "
        "algorithm algorithms runtime endpoint endpoints backend frontend localhost http "
        "https cors repo repository commit commits rebase merge stash staged checkout "
        "unittest mock mocking awk sed grep curl ssh chmod cron crontab sudo "
        "stdout stderr config iterate iterating iterator loop loops quicksort fibonacci "
        "palindrome linked binary bytecode serialize deserialize parser parsing "
        "typeerror valueerror keyerror nullpointerexception crud oop off-by-one big-o",
    ),
    **_weigh(  # common in programming, but not only there
        0.8,
        "class classes method methods object objects module modules import library "
        "libraries framework package packages dependency dependencies deploy deployment "
        "container containers pipeline workflow build test tests testing "
        "assertion error errors crash crashes crashing install installed server query "
        "queries schema database index cache interface type types hints parse thread threads "
        "process optimize migration developer software app webhook",
    ),
    **_weigh(  # more tools and platforms
        2.0,
        "jupyter ipython parquet eslint prettier linter lint tslint flake8 mypy pylint "
        "grpc protobuf restful graphql websocket websockets oauth jwt csrf xss tailwind "
        "next.js nextjs nuxt redux webassembly wasm cuda llvm gcc clang cmake "
        "valgrind gdb lldb intellij pycharm xcode vscode jenkins circleci argocd istio "
        "grafana sqlalchemy prisma orm celery rabbitmq airflow dbt "
        "hadoop bigquery etl scikit-learn sklearn keras numpy huggingface "
        "virtualenv venv pipenv nuget rubygems homebrew apt-get "
        "selenium playwright cypress jsonschema openapi swagger postman ajax jsx tsx "
        "ec2 s3 vpc rds cloudformation pulumi serverless ci/cd devops",
    ),
    **_weigh(  # more programming concepts
        1.6,
        "closure closures oneliner one-liner hoisting generics "
        "polymorphism singleton decorator decorators coroutine coroutines goroutine "
        "goroutines concurrency multithreading race-condition "
        "memoization memoize recursion bfs dfs leetcode hashing hashtable linkedlist "
        "stackoverflow nullable immutable mutable refactored deprecated "
        "dependency-injection microservice microservices monorepo codegen transpile "
        "transpiler minify bundler localhost ssl tls dns tcp udp sockets publickey "
        "ssh-key keypair env dotenv stdin argv regexes repl ide sdk kernel-panic "
        "compile-time runtime-error typescript's python's java's",
    ),
    **_weigh(  # words that lean to code in context
        0.8,
        "deploying deployed rollback endpoint token tokens auth authentication login session "
        "encoding unicode utf-8 base64 encryption port proxy backend frontend fullstack "
        "cluster pod pods namespace ingress replica replicas migration migrations join joins "
        "transaction transactions recursively recursive iterate dependency versioning "
        "install latency",
    ),
    **_weigh(1.2, "código codigo programa programación fehler erro programm"),
}

_ANALYSIS_WORDS: dict[str, float] = {
    **_weigh(
        2.4,
        "analyze analyse analysis analyzing analysing analytical summarize summarise "
        "summary summarizing critique swot correlation correlated forecast forecasting "
        "methodology evaluate evaluating evaluation assess assessing assessment fallacy "
        "fallacies tl;dr tldr",
    ),
    **_weigh(
        1.6,
        "compare comparing comparison contrast interpret interpretation insights trend "
        "trends implications findings statistics statistical significant significance "
        "regression tradeoffs trade-offs tradeoff trade-off pros cons advantages "
        "disadvantages strengths weaknesses validity thesis sentiment themes roi kpi kpis "
        "cost-benefit benchmark",
    ),
    **_weigh(
        0.8,
        "data dataset datasets metrics revenue margin margins profit profitability churn "
        "funnel conversion growth market competitive competitor competitors landscape risks "
        "risk impact effects causes factors reasons argument arguments evidence claim "
        "conclusions conclude bias biased report survey patterns breakdown rank ranking "
        "median average quarter quarterly investment versus vs critical investigate "
        "economic economics policy policies budget pricing cost costs performance "
        "efficiency productivity demand spend identify review contract clause investing "
        "numbers",
    ),
    **_weigh(  # more analysis verbs, metrics and research words
        1.6,
        "weigh weighing scrutinize examine examining appraise appraisal diagnose audit "
        "prioritize prioritise consequences outcomes outlook predict prediction predictions "
        "projection projections feasibility viability causal causation confounder "
        "hypothesis hypotheses cohort retention segmentation variance deviation percentile "
        "percentiles distribution outlier outliers anomaly anomalies nps csat cac ltv arr mrr "
        "gdp inflation recession valuation takeaways counterargument rebuttal rhetoric "
        "rhetorical symbolism motif motifs inference infer deduce meta-analysis "
        "pestle strategic strategy weakest strongest pros/cons",
    ),
    **_weigh(
        0.8,
        "likely drop dropped decline declined declining increase increased decrease "
        "decreased spike dip surge trendline study studies research researchers literature "
        "respondents sample sampling poll polls estimate estimates ratio stock stocks "
        "portfolio returns failure outcome criteria reasoning logic logical assessment",
    ),
    **_weigh(  # compare, analyse, advantages, causes in a few other languages
        1.6,
        "compara comparar comparer vergleiche vergleichen análisis analiza analysieren "
        "ventajas desventajas avantages inconvénients vorteile nachteile ursachen umsatz "
        "tendencia",
    ),
}

_CREATIVE_WORDS: dict[str, float] = {
    **_weigh(  # the name of a genre is the strongest hint there is
        4.0,
        "poem poems poetry haiku haikus limerick sonnet ballad lyrics screenplay slogan "
        "slogans tagline taglines backstory jingle riddle parody satire fable fairytale "
        "poema poème gedicht cuento conte",
    ),
    **_weigh(
        2.6,
        "story stories tale tales fiction novel verse rhyme rhymes rhyming song songs chorus "
        "monologue joke jokes protagonist villain fantasy sci-fi scifi imagine imaginative "
        "poetic poetically narrate roleplay role-play mascot comedic comedy humorous "
        "horoscope eulogy bedtime mythological myth caption headline headlines "
        "canción chanson histoire",
    ),
    **_weigh(
        1.4,
        "creative character characters plot scene dialogue hero heroine dragon wizard "
        "witty funny pun puns invent brainstorm names catchy vivid whimsical spooky epic "
        "shakespearean insult toast speech tweet ad advert rap compose composing "
        "narrative legend tavern kingdom kingdoms",
    ),
    **_weigh(  # more forms, genres and craft words
        2.6,
        "couplet couplets stanza stanzas ode elegy acrostic quatrain prose vignette "
        "worldbuilding premise premises fanfic fanfiction lore superhero superpower "
        "storyline storytelling storyboard screenplay sitcom standup stand-up roast "
        "catchphrase motto blurb copywriting wordplay alliteration metaphor simile "
        "tongue-twister pickup",
    ),
    **_weigh(
        1.4,
        "mystery thriller romance horror comic cartoon anime quest adventure spell magic elf "
        "elves orc dungeon npc monster monsters alien aliens robot robots time-travel "
        "narrator genre sensory evocative lyrical playful cozy quirky fictional invented "
        "imaginary pirate pirates ghost ghosts haunted detective sequel prequel greeting "
        "nickname",
    ),
}

_CHAT_WORDS: dict[str, float] = {
    **_weigh(
        2.0,
        "hi hello hey hiya howdy yo thanks thank thx ty bye goodbye cheers hola bonjour "
        "hallo ciao olá salut lol haha",
    ),
    **_weigh(
        0.8,
        "ok okay cool feeling feel advice recommend recommendation suggest tips weekend "
        "recipe cook cooking trip travel weather vacation birthday gift friend friends "
        "roommate homework bored",
    ),
}

# --- phrases: looked up only at the tokens that can start one ---------------------------------


def _phrases(task: TaskType, weight: float, phrases: str) -> dict[str, tuple[TaskType, float]]:
    return dict.fromkeys((p.strip() for p in phrases.split(",")), (task, weight))


_PHRASES: dict[str, tuple[TaskType, float]] = {
    **_phrases(
        "analysis",
        1.8,
        "pros and cons, for and against, root cause, explain why, break down, "
        "what conclusions, trade offs, cost benefit, second order, compared to, a/b test, "
        "bounce rate, total cost, what patterns, what trends",
    ),
    **_phrases(
        "creative",
        2.2,
        "once upon, upon a time, love letter, short story, bedtime story, in the style, "
        "in the voice, make up, come up with, birthday card, game master, fairy tale, "
        "flash fiction, opening paragraph, first chapter, plot outline, picture book, "
        "ad script, radio spot, product description, band names",
    ),
    **_phrases(
        "coding",
        2.0,
        "stack trace, unit test, unit tests, pull request, merge conflict, big o, hello world, "
        "type hints, in go, in c, status code, environment variable, environment variables, "
        "command line, seq scan, off by one, linked list, rest api, github actions, "
        "code review",
    ),
    **_phrases(
        "chat",
        1.2,
        "how are, how r, how's it, good morning, good night, what's up, thank you, have a, "
        "any ideas, any advice, any tips, simple terms, like i'm, who are you, what can you",
    ),
}
_WORD_SOURCES: tuple[tuple[TaskType, dict[str, float]], ...] = (
    ("coding", _CODING_WORDS),
    ("analysis", _ANALYSIS_WORDS),
    ("creative", _CREATIVE_WORDS),
    ("chat", _CHAT_WORDS),
)


def _spaced_words() -> dict[str, tuple[TaskType, float]]:
    """Hyphenated words also match when written with spaces: "race condition"."""
    spaced: dict[str, tuple[TaskType, float]] = {}
    for task, words in _WORD_SOURCES:
        for word, weight in words.items():
            parts = word.split("-")
            if 2 <= len(parts) <= 3 and all(parts):
                spaced[" ".join(parts)] = (task, weight)
    return spaced


# Listed phrases win over spaced-out words.
_ALL_PHRASES = {**_spaced_words(), **_PHRASES}
_PHRASE_FIRST = frozenset(p.split()[0] for p in _ALL_PHRASES)

# "write a <...> poem": the noun named soon after a request verb is what is wanted.
_REQUEST_VERBS = _words(
    "write compose create generate give make draft brainstorm craft invent implement build "
    "code come tell rewrite"
)
_CREATIVE_NOUNS = _words(
    "poem poems story stories song songs lyrics haiku limerick sonnet tale slogan slogans "
    "tagline taglines joke jokes riddle scene ballad jingle fable speech toast caption names "
    "verse chorus monologue backstory headline headlines"
)
_CODING_NOUNS = _words(
    "function script program class method query regex endpoint module test tests dockerfile "
    "makefile workflow component extension interface schema api cli algorithm"
)
_ABOUT_VERBS = _words("write compose tell")
_ARTICLES = _words("a an some")
_FINDING_QUESTIONS = _words("what which")
_FINDING_NOUNS = _words(
    "trend trends pattern patterns conclusion conclusions factor factors cause causes "
    "implication implications risk risks metrics"
)
_GREETINGS = _words("hi hello hey hiya thanks thank hola bonjour hallo")
_SEQUENCE_STARTS = _PHRASE_FIRST | _REQUEST_VERBS | _FINDING_QUESTIONS
_CODE_LINE_KEYWORDS = _words("def class import from #include package func fn public private")

# --- shapes: named in <angle brackets> so they cannot collide with a word --------------------

_SHAPES: dict[str, tuple[TaskType, float]] = {
    "<fence>": ("coding", 3.0),
    "<stack-trace>": ("coding", 3.0),
    "<error-name>": ("coding", 2.0),
    "<code-line-start>": ("coding", 2.5),
    "<code-line-end>": ("coding", 1.6),
    "<method-call>": ("coding", 1.6),
    "<empty-call>": ("coding", 1.0),
    "<camel-case>": ("coding", 1.2),
    "<snake-case>": ("coding", 0.6),
    "<cli-flag>": ("coding", 0.8),
    "<inline-code>": ("coding", 0.8),
    "<operator>": ("coding", 1.0),
    "<sql>": ("coding", 2.5),
    "<big-o>": ("coding", 1.5),
    "<file-name>": ("coding", 1.2),
    "<asks-for-code>": ("coding", 2.0),
    "<asks-for-writing>": ("creative", 2.0),
    "<write-about>": ("creative", 1.0),
    "<money-or-percent>": ("analysis", 0.8),
    "<many-numbers>": ("analysis", 1.0),
    "<asks-for-findings>": ("analysis", 1.0),
    "<greeting-first>": ("chat", 1.0),
}

# A shape's regex runs only when one of its plain-substring gates is in the text:
# Python's re has no fast prefilter for patterns that start with a character class.
_Gated = tuple[tuple[str, tuple[str, ...], re.Pattern[str] | None], ...]
# Shapes that need one of these characters; most prose has none, and skips them all at once.
_CODE_CHARS = re.compile(r"[`(){};_=!<>&|+:$€£%]")
_CODE_SHAPES: _Gated = (
    ("<fence>", ("```",), None),
    ("<stack-trace>", ("Traceback (most recent call last)",), None),
    ("<stack-trace>", ("\tat ", "    at "), re.compile(r"^\s+at [\w.$]+\(", re.M)),
    ("<code-line-end>", (";", "{", "}"), re.compile(r"[;{}][ \t]*$", re.M)),
    ("<method-call>", ("(",), re.compile(r"\.(?<=\w\.)[A-Za-z_]\w*\([^()\n]{0,40}\)")),
    ("<empty-call>", ("()",), re.compile(r"\w\(\)")),
    ("<snake-case>", ("_",), re.compile(r"[a-z]_[a-z]")),
    ("<inline-code>", ("`",), re.compile(r"`[^`\n]+`")),
    (  # the second character first, so re can scan for it fast
        "<operator>",
        ("=", "&", "|", "+", ":"),
        re.compile(r"[=>&|+:](?<===|!=|<=|>=|&&|\|\||=>|\+\+|::)"),
    ),
    ("<big-o>", ("O(",), re.compile(r"\bO\([^()\n]{1,12}\)")),
    ("<money-or-percent>", ("$", "€", "£", "%"), re.compile(r"[$€£]\s?\d|\d\s?[%€]")),
)
_PROSE_SHAPES: _Gated = (
    ("<error-name>", ("Error", "Exception"), re.compile(r"\b[A-Z]\w*(?:Error|Exception)\b")),
    ("<cli-flag>", (" -", "\n-"), re.compile(r"\s--?[a-zA-Z]")),
    (
        "<file-name>",
        (".",),
        re.compile(r"\.(?<=\w\.)(?:py|js|ts|tsx|jsx|java|go|rs|cpp|c|h|rb|php|sh|ya?ml|toml)\b"),
    ),
)
# Upper case right after two lower-case letters; a candidate is camelCase when its word
# starts in lower case (useEffect), not when it is a brand (YouTube, JavaScript).
_CAMEL_CANDIDATE = re.compile(r"[A-Z](?<=[a-z][a-z][A-Z])")
MAX_IDENTIFIER_CHARS = 40
MAX_CAMEL_CANDIDATES = 8  # bounds the Python-level checks on adversarial text
_CODE_LINE_START = re.compile(
    r"^[ \t]*(?:def|class|import|from|#include|package|func|fn|public|private)[ \t]+[\w.<>]",
    re.M,
)
_SQL = re.compile(r"\bselect\b[\s\S]{1,300}?\bfrom\b")
_TOKEN_RE = re.compile(r"\w[\w+#'.&/;-]*(?<![.'&/;-])")


def _plural(word: str) -> str | None:
    """The regular plural of a listed word, or None when a guess would be risky."""
    if len(word) < MIN_PLURAL_STEM or not word.isalpha() or word.endswith("s"):
        return None  # short words make bad guesses: "hi" -> "his"
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    if word.endswith(("x", "ch", "sh", "z")):
        return word + "es"
    return word + "s"


def _build_table() -> dict[str, tuple[tuple[TaskType, float], ...]]:
    table: dict[str, list[tuple[TaskType, float]]] = {}
    for task, words in _WORD_SOURCES:
        for word, weight in words.items():
            table.setdefault(word, []).append((task, weight))
    # Written the other way: "trade-off" for "trade off", "unit-test" for "unit test".
    for phrase, entry in _PHRASES.items():
        table.setdefault(phrase.replace(" ", "-"), []).append(entry)
    # Listed words win over guessed plurals.
    plurals: dict[str, list[tuple[TaskType, float]]] = {}
    for word, entries in table.items():
        plural = _plural(word)
        if plural is not None and plural not in table:
            plurals.setdefault(plural, []).extend(entries)
    table.update(plurals)
    for key, entry in (*_ALL_PHRASES.items(), *_SHAPES.items()):
        table.setdefault(key, []).append(entry)
    return {key: tuple(entries) for key, entries in table.items()}


# word, phrase or shape -> its (task, weight) contributions
_TABLE = _build_table()
_TABLE_KEYS = frozenset(_TABLE)


@dataclass(frozen=True, slots=True)
class TaskGuess:
    """A detection with the scores behind it, for ``explain`` output and debug logs."""

    task: TaskType
    scores: Mapping[TaskType, float]

    @property
    def margin(self) -> float:
        """How far the winner is ahead of the runner-up (0 = a coin toss)."""
        ranked = sorted(self.scores.values(), reverse=True)
        return ranked[0] - ranked[1]


def _has_camel_case(text: str) -> bool:
    for match in islice(_CAMEL_CANDIDATE.finditer(text), MAX_CAMEL_CANDIDATES):
        upper = match.start()
        begin, stop = upper, max(0, upper - MAX_IDENTIFIER_CHARS)
        while begin > stop and text[begin - 1].isalpha():
            begin -= 1
        if text[begin:upper].islower():
            return True
    return False


def _add_gated(text: str, shapes: _Gated, hits: set[str]) -> None:
    contains = text.__contains__
    for name, gates, pattern in shapes:
        if any(map(contains, gates)) and (pattern is None or pattern.search(text) is not None):
            hits.add(name)


def _text_shapes(text: str, tokens: set[str], hits: set[str]) -> None:
    if _CODE_CHARS.search(text) is not None:
        _add_gated(text, _CODE_SHAPES, hits)
    _add_gated(text, _PROSE_SHAPES, hits)
    if _has_camel_case(text):
        hits.add("<camel-case>")
    if not _CODE_LINE_KEYWORDS.isdisjoint(tokens) and _CODE_LINE_START.search(text):
        hits.add("<code-line-start>")
    if "select" in tokens and "from" in tokens and _SQL.search(text.lower()) is not None:
        hits.add("<sql>")


def _token_sequences(tokens: list[str], distinct: set[str], hits: set[str]) -> None:
    """Phrases and request shapes, looked up where one of their first words occurs."""
    if tokens and tokens[0] in _GREETINGS:
        hits.add("<greeting-first>")
    if sum(1 for token in distinct if token[0].isdigit()) >= MIN_NUMBERS_FOR_DATA:
        hits.add("<many-numbers>")
    for token in distinct & _SEQUENCE_STARTS:
        # list.index scans in C: cheaper than a Python loop over every token
        i = tokens.index(token)
        while True:
            _sequences_at(tokens, i, hits)
            try:
                i = tokens.index(token, i + 1)
            except ValueError:
                break


def _sequences_at(tokens: list[str], i: int, hits: set[str]) -> None:
    token = tokens[i]
    if token in _PHRASE_FIRST:
        for phrase in (" ".join(tokens[i : i + 2]), " ".join(tokens[i : i + 3])):
            if phrase in _ALL_PHRASES:
                hits.add(phrase)
    window = tokens[i + 1 : i + 1 + REQUEST_WINDOW]
    if token in _REQUEST_VERBS:
        if not _CREATIVE_NOUNS.isdisjoint(window):
            hits.add("<asks-for-writing>")
        if not _CODING_NOUNS.isdisjoint(window):
            hits.add("<asks-for-code>")
        rest = window[1:] if window[:1] == ["me"] else window
        if token in _ABOUT_VERBS and rest[:1] and rest[0] in _ARTICLES and "about" in rest:
            hits.add("<write-about>")
    elif token in _FINDING_QUESTIONS and not _FINDING_NOUNS.isdisjoint(window):
        hits.add("<asks-for-findings>")


def _evidence(text: str, into: dict[TaskType, float], weight: float) -> None:
    """Add ``weight`` times the evidence found in ``text`` to ``into``."""
    if not text:
        return
    tokens = _TOKEN_RE.findall(text.lower())
    distinct = set(tokens)
    hits = distinct & _TABLE_KEYS
    _text_shapes(text, distinct, hits)
    _token_sequences(tokens, distinct, hits)
    for key in hits:
        for task, value in _TABLE[key]:
            into[task] += value * weight


def _best(scores: dict[TaskType, float]) -> TaskType:
    # max() keeps the first of equal scores, and the dict starts with "chat".
    return max(scores, key=scores.__getitem__)


def score_task(text: str) -> dict[TaskType, float]:
    """Per-type scores for one user prompt (the highest wins; chat includes its prior)."""
    scores = dict.fromkeys(TASK_TYPES, 0.0)
    scores["chat"] = CHAT_PRIOR
    if isinstance(text, str):
        _evidence(text[-MAX_LAST_USER_CHARS:], scores, WEIGHT_LAST_USER)
    return scores


def detect_task_text(text: str) -> TaskType:
    """The task type of one user prompt; "chat" when unclear."""
    return _best(score_task(text))


def _guess(scores: dict[TaskType, float]) -> TaskGuess:
    rounded = {task: round(score, SCORE_DECIMALS) for task, score in scores.items()}
    return TaskGuess(_best(scores), rounded)


def guess_task_text(text: str) -> TaskGuess:
    """Detect the task of one user prompt, with the scores that decided it."""
    return _guess(score_task(text))


def message_text(content: object) -> str:
    """The text of an OpenAI message ``content``: a string or a list of parts.

    Only ``{"type": "text", "text": ...}`` parts count; images, audio and
    anything malformed are skipped.
    """
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    texts: list[str] = []
    for part in content:
        if isinstance(part, Mapping) and part.get("type") == "text":
            text = part.get("text")
            if isinstance(text, str):
                texts.append(text)
    return "\n".join(texts)


def _role_and_text(message: object) -> tuple[str, str]:
    if not isinstance(message, Mapping):
        return "", ""
    role = message.get("role")
    return (role if isinstance(role, str) else ""), message_text(message.get("content"))


def score_messages(messages: Sequence[Mapping[str, object]]) -> dict[TaskType, float]:
    """Per-type scores for a chat request's ``messages`` (chat includes its prior)."""
    scores = dict.fromkeys(TASK_TYPES, 0.0)
    scores["chat"] = CHAT_PRIOR
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes):
        return scores
    seen_last_user = seen_assistant = False
    earlier_users = 0
    # Walk back from the end so a long conversation costs no more than a short one.
    for message in reversed(messages[-MAX_MESSAGES_SCANNED:]):
        role, text = _role_and_text(message)
        if role == "user" and not seen_last_user:
            seen_last_user = True
            _evidence(text[-MAX_LAST_USER_CHARS:], scores, WEIGHT_LAST_USER)
        elif role == "user":
            _evidence(text[-MAX_OTHER_CHARS:], scores, WEIGHT_EARLIER_USER)
            earlier_users += 1
            if earlier_users >= MAX_EARLIER_USER:
                break
        elif role == "assistant" and not seen_assistant:
            seen_assistant = True
            _evidence(text[-MAX_OTHER_CHARS:], scores, WEIGHT_ASSISTANT)
    # System prompts lead the conversation; their instructions are at their start.
    for message in messages[:MAX_SYSTEM]:
        role, text = _role_and_text(message)
        if role in _SYSTEM_ROLES:
            _evidence(text[:MAX_OTHER_CHARS], scores, WEIGHT_SYSTEM)
    return scores


def detect_task(messages: Sequence[Mapping[str, object]]) -> TaskType:
    """The task type of an OpenAI chat request's ``messages``; "chat" when unclear."""
    return _best(score_messages(messages))


def guess_task(messages: Sequence[Mapping[str, object]]) -> TaskGuess:
    """Detect the task of a chat request's ``messages``, with the scores that decided it."""
    return _guess(score_messages(messages))
