"""Using a trained model, whichever kind it is: the saved-models CLI and the chat widget."""
