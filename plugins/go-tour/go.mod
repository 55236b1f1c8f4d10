module apex/plugins/go-tour

go 1.23
