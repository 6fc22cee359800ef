# Convenience targets; each is one command a newcomer could also type.
.PHONY: run test lint fmt release

run:
	cargo run --release

test:
	scripts/test

lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings

fmt:
	cargo fmt

release:
	cargo build --release
