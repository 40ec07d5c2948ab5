"""The Gradio demo for one-step sampling."""
