"""Text prompts above the predictor: phrase generation and the open-vocabulary detector ("grounding")
path. The text head itself is a network (:mod:`segany.modeling.text_prompt`) with its own file
(:mod:`segany.checkpoint_text`), and the predictor answers text prompts through it; nothing below this
package imports it."""
