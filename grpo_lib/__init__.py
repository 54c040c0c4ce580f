"""grpo_lib: Flow-GRPO for counting."""
