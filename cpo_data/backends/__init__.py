"""Heavy backends (Hugging Face generation, COMET, sacrebleu), imported lazily by the stages."""
