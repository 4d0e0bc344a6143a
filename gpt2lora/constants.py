"""Names and values several layers share: file names of checkpoints, adapters and run folders, and the label
value that marks a position as no target. One place, so a folder written by one module is read by another."""

#: A label at this position is not a target (transformers' and torch's ``ignore_index``).
IGNORE_INDEX = -100
#: Rows of the LM head computed at a time by the chunked loss (26 MB of fp32 logits for GPT-2's vocabulary).
DEFAULT_LOSS_CHUNK_SIZE = 128

# --- a model checkpoint (Hugging Face layout) ---
MODEL_CONFIG_FILE = "config.json"
MODEL_WEIGHTS_FILE = "model.safetensors"
MODEL_WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("vocab.json", "merges.txt")

# --- an adapter (peft layout) ---
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE)

# --- a training checkpoint inside a run folder ---
CHECKPOINT_PREFIX = "checkpoint-"
BEST_CHECKPOINT = "best"
TRAINER_STATE_FILE = "trainer_state.json"
TRAINABLE_WEIGHTS_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"

# --- a run folder ---
RUN_CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
SUMMARY_FILE = "summary.md"
HISTORY_FILE = "history.jsonl"
RESPONSES_FILE = "responses.jsonl"
JUDGE_SCORES_FILE = "judge.jsonl"
JUDGE_SUMMARY_FILE = "judge.json"
CARD_FILE = "README.md"
#: A folder of several runs (a sweep, a recipe, the quickstart): every row, as JSON and CSV.
RESULTS_FILE = "results.json"
RESULTS_CSV_FILE = "results.csv"
#: A recipe's comparison of the published figures with this run's.
RECIPE_REPORT_FILE = "report.md"
#: A data folder's class names, in class-id order.
LABEL_NAMES_FILE = "label_names.json"
