module github.com/cachecar/cachecar

go 1.26.0
