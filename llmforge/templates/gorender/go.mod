module llmforge/gorender

go 1.22
