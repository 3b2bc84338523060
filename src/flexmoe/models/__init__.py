"""Models: loading any transformers MoE causal LM, and building flexmoe's built-in base model."""
