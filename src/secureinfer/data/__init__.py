"""Files that ship inside the package: the demo adapter, the facts it was trained on, the evaluation text."""

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
DEMO_ADAPTER = DATA_DIR / "adapters" / "demo-facts"
DEMO_FACTS = DATA_DIR / "facts" / "demo_facts.json"
EVAL_TEXT = DATA_DIR / "texts" / "eval.txt"
CONVERSATIONS = DATA_DIR / "conversations" / "conversations.json"
