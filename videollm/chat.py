"""`python -m videollm.chat`: terminal chat with a checkpoint (see `videollm.infer.chat`)."""

from videollm.infer.chat import main

if __name__ == "__main__":
    main()
