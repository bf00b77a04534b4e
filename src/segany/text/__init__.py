"""Text prompts: the learned text head, phrase generation, several-instance answers and the
open-vocabulary detector ("grounding") path."""
