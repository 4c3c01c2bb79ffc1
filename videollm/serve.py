"""`python -m videollm.serve`: the OpenAI-compatible server (see `videollm.infer.serve`)."""

from videollm.infer.serve import main

if __name__ == "__main__":
    main()
