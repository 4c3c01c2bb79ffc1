"""`python -m videollm.demo`: the Gradio web demo (see `videollm.infer.demo`)."""

from videollm.infer.demo import main

if __name__ == "__main__":
    main()
