from msgd.server.daemon import main

raise SystemExit(main())
